//! Sequence log-probabilities of completions (methods.md section 1):
//! `lp(y) = sum_t log pi(y_t | x, y_<t)` over completion tokens only, in f32.

use candle_core::{DType, Device, Tensor};
use prefopt_data::{TokenizedPair, TokenizedSequence};
use prefopt_model::ops::segment_sum;
use prefopt_model::{Checkpoints, Dropout, Llama};

/// Right-padded token sequences with the completion positions marked.
pub struct SequenceBatch {
    /// (B, T) u32, padded with `pad_id` after each sequence.
    pub input_ids: Tensor,
    /// (B, T-1) u32: the token each position predicts (`input_ids[:, 1:]`).
    pub targets: Tensor,
    /// (B, T-1) f32: 1 where the predicted token is a completion token, else 0.
    pub completion_mask: Tensor,
    /// Completion token count of each sequence, `|y|`.
    pub completion_lens: Vec<usize>,
    /// Total tokens (prompt + completion, no padding), for throughput figures.
    pub num_tokens: usize,
}

impl SequenceBatch {
    /// Pads `seqs` to a common length. Right padding keeps every real token's position,
    /// so the causal mask alone keeps padding out of the real tokens' logits.
    pub fn new(seqs: &[&TokenizedSequence], pad_id: u32, device: &Device) -> candle_core::Result<Self> {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.input_ids.len()).max().unwrap_or(0).max(2);
        let mut ids = vec![pad_id; b * t];
        let mut mask = vec![0f32; b * (t - 1)];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.input_ids.len()].copy_from_slice(&s.input_ids);
            // Position p predicts token p + 1; completion tokens start at `completion_start`.
            for p in s.completion_start.max(1) - 1..s.input_ids.len() - 1 {
                mask[i * (t - 1) + p] = 1.0;
            }
        }
        let input_ids = Tensor::from_vec(ids, (b, t), device)?;
        let targets = input_ids.narrow(1, 1, t - 1)?.contiguous()?;
        Ok(Self {
            input_ids,
            targets,
            completion_mask: Tensor::from_vec(mask, (b, t - 1), device)?,
            completion_lens: seqs.iter().map(|s| s.completion_len()).collect(),
            num_tokens: seqs.iter().map(|s| s.input_ids.len()).sum(),
        })
    }
}

/// Per-sequence results of one forward pass.
pub struct CompletionLogps {
    /// (B,) summed completion log-probs, in nats.
    pub logps: Tensor,
    /// (B,) sum over completion positions of the mean logit over the vocabulary
    /// (for TRL's `logits/chosen` metric: divide the batch sum by the token count).
    pub logit_sums: Tensor,
    /// With gradient checkpointing, what the backward pass recomputes the blocks from
    /// (pass it to `trainer::backward`).
    pub checkpoints: Option<Checkpoints>,
}

/// Whether a forward pass for training keeps every activation or only the blocks' inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// Keep every activation for the backward pass (fastest).
    Off,
    /// Keep each decoder block's input and recompute the block in the backward pass
    /// (TRL's `gradient_checkpointing`: about a third more compute, far less memory).
    On,
}

/// Runs `model` on the batch and sums log-probs over completion tokens. The LM head and the
/// log-softmax (one fused op, f32 with f64 accumulation, that never holds the logits) run
/// only at the positions that predict a completion token: prompt and padding positions cost
/// nothing and pass no gradient. A sequence's sum accumulates in f64 (`ops::segment_sum`),
/// so it does not depend on what else is in the batch.
pub fn completion_logps(model: &Llama, batch: &SequenceBatch) -> prefopt_model::Result<CompletionLogps> {
    let h = model.hidden_states(&batch.input_ids, &[], None)?;
    logps_from_hidden(model, batch, h, None)
}

/// [`completion_logps`] for a training step: with or without gradient checkpointing, and
/// with the trainable adapters' dropout masks (`dropout`; `None` when there are none).
pub fn completion_logps_for_training(
    model: &Llama,
    batch: &SequenceBatch,
    checkpointing: Checkpointing,
    dropout: Option<Dropout>,
) -> prefopt_model::Result<CompletionLogps> {
    let (h, checkpoints) =
        model.hidden_states_for_training(&batch.input_ids, checkpointing == Checkpointing::On, dropout)?;
    logps_from_hidden(model, batch, h, checkpoints)
}

/// The LM head, log-softmax and per-sequence sums over final-norm hidden states (B, T, C).
fn logps_from_hidden(
    model: &Llama,
    batch: &SequenceBatch,
    h: Tensor,
    checkpoints: Option<Checkpoints>,
) -> prefopt_model::Result<CompletionLogps> {
    let (b, t, c) = h.dims3()?;
    let ids: Vec<Vec<u32>> = batch.targets.to_vec2()?;
    let mask: Vec<Vec<f32>> = batch.completion_mask.to_vec2()?;
    // Rows of (B*T, C) that predict a completion token, their targets, and which sequence
    // each belongs to.
    let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (ids, mask)) in ids.iter().zip(&mask).enumerate() {
        for (p, (&id, &m)) in ids.iter().zip(mask).enumerate() {
            if m != 0.0 {
                rows.push((i * t + p) as u32);
                targets.push(id);
                owner.push(i);
            }
        }
    }
    let device = h.device();
    if rows.is_empty() {
        let zeros = Tensor::zeros(b, DType::F32, device)?;
        return Ok(CompletionLogps { logps: zeros.clone(), logit_sums: zeros, checkpoints });
    }
    let picked = h.reshape((b * t, c))?.index_select(&Tensor::new(rows, device)?, 0)?; // (R, C)
    let logps = segment_sum(&model.token_logps(&picked, &targets)?, &owner, b)?; // (B,)
                                                                                 // A metric only: detached, so it adds nothing to the graph.
    let logit_sums = segment_sum(&model.mean_logits(&picked)?, &owner, b)?;
    Ok(CompletionLogps { logps, logit_sums, checkpoints })
}

/// Summed completion log-probs `(lp(chosen), lp(rejected))` of each pair under `model`, in
/// order: the one scoring path of prefopt (reference log-probs, `prefopt score`, the loop's
/// exact reference, the demo's base model). `batch_size` pairs share a forward pass, their
/// chosen sequences first and their rejected ones after, the layout the trainer's steps use.
/// `progress` hears the number of pairs done after each batch.
pub fn score_pairs(
    model: &Llama,
    pairs: &[&TokenizedPair],
    batch_size: usize,
    pad_id: u32,
    mut progress: impl FnMut(usize),
) -> prefopt_model::Result<Vec<(f32, f32)>> {
    let device = model.device();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let seqs: Vec<&TokenizedSequence> =
            chunk.iter().map(|p| &p.chosen).chain(chunk.iter().map(|p| &p.rejected)).collect();
        let batch = SequenceBatch::new(&seqs, pad_id, device)?;
        let lp: Vec<f32> = completion_logps(model, &batch)?.logps.to_vec1()?;
        let n = chunk.len();
        out.extend((0..n).map(|i| (lp[i], lp[n + i])));
        progress(out.len());
    }
    Ok(out)
}
