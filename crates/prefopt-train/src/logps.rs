//! Sequence log-probabilities of completions (methods.md section 1):
//! `lp(y) = sum_t log pi(y_t | x, y_<t)` over completion tokens only, in f32.

use candle_core::{DType, Device, Tensor};
use prefopt_data::{TokenizedPair, TokenizedSequence};
use prefopt_model::ops::{segment_sum, PackedSpan};
use prefopt_model::{Checkpoints, Dropout, Llama};

/// How a micro-batch's sequences are laid out for the forward pass (docs/train.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    /// The token that fills padded rows.
    pub pad_id: u32,
    /// Pack the sequences side by side into one row, each attending only to itself, instead
    /// of right-padding them to the longest (TRL's `padding_free`).
    pub padding_free: bool,
    /// Lay a pair out as `[prompt, chosen, rejected]`, the prompt's tokens run once for both
    /// completions (pairs whose two sequences start with different prompt tokens keep two
    /// copies).
    pub share_prompt: bool,
}

impl BatchLayout {
    /// Right-padded rows, one per sequence: the reference layout.
    pub fn padded(pad_id: u32) -> Self {
        Self { pad_id, padding_free: false, share_prompt: false }
    }

    /// The layout of a forward pass of `model`: padded rows for a training pass that draws
    /// LoRA dropout masks (they are drawn per padded row, and one copy of a shared prompt
    /// could not carry both sequences' masks), else this one.
    pub fn for_pass(self, model: &Llama, training: bool) -> Self {
        if training && model.draws_dropout() {
            Self::padded(self.pad_id)
        } else {
            self
        }
    }
}

/// A micro-batch of token sequences with the positions that predict completion tokens:
/// right-padded rows (B, T), or one packed row (1, R) of spans.
pub struct SequenceBatch {
    /// (B, T) u32, padded with the pad id after each sequence; or (1, R) packed.
    pub input_ids: Tensor,
    /// The packed row's spans; empty for padded rows.
    pub spans: Vec<PackedSpan>,
    /// Rows of the flattened input (B*T or R) that predict a completion token, the token
    /// each predicts, and the sequence it belongs to (a row of a shared prompt's last token
    /// predicts both completions' first tokens).
    predict_rows: Vec<u32>,
    targets: Vec<u32>,
    owner: Vec<usize>,
    /// Completion token count of each sequence, `|y|`.
    pub completion_lens: Vec<usize>,
    /// Real tokens of the sequences (prompt + completion, no padding; a shared prompt counted
    /// once per sequence), for throughput figures.
    pub num_tokens: usize,
    /// Tokens the forward pass runs: padding included, a shared prompt once.
    pub forward_tokens: usize,
}

impl SequenceBatch {
    /// Pads `seqs` to a common length. Right padding keeps every real token's position,
    /// so the causal mask alone keeps padding out of the real tokens' logits.
    pub fn new(seqs: &[&TokenizedSequence], pad_id: u32, device: &Device) -> candle_core::Result<Self> {
        let t = seqs.iter().map(|s| s.input_ids.len()).max().unwrap_or(0).max(2);
        let mut row = PackedRow::default();
        for (i, s) in seqs.iter().enumerate() {
            row.push_single(s, i);
            row.pad_to((i + 1) * t, pad_id);
        }
        row.finish(seqs, Some((seqs.len(), t)), device)
    }

    /// The sequences side by side in one row without padding, each its own span.
    pub fn packed(seqs: &[&TokenizedSequence], device: &Device) -> candle_core::Result<Self> {
        let mut row = PackedRow::default();
        for (i, s) in seqs.iter().enumerate() {
            row.push_single(s, i);
        }
        row.finish(seqs, None, device)
    }

    /// Sequences laid out as `layout` says (`share_prompt` does not apply).
    pub fn sequences(seqs: &[&TokenizedSequence], layout: BatchLayout, device: &Device) -> candle_core::Result<Self> {
        if layout.padding_free {
            Self::packed(seqs, device)
        } else {
            Self::new(seqs, layout.pad_id, device)
        }
    }

    /// Pairs (chosen[i], rejected[i]) as sequences `0..n` (chosen) and `n..2n` (rejected),
    /// the order the objectives read, laid out as `layout` says.
    pub fn pairs(
        chosen: &[&TokenizedSequence],
        rejected: &[&TokenizedSequence],
        layout: BatchLayout,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let seqs: Vec<&TokenizedSequence> = chosen.iter().chain(rejected).copied().collect();
        if !layout.share_prompt {
            return Self::sequences(&seqs, layout, device);
        }
        let n = chosen.len();
        let pairs = || chosen.iter().zip(rejected).map(|(c, r)| (*c, *r, shares_prompt(c, r)));
        // Padded rows: each pair at a multiple of the widest pair.
        let width = match layout.padding_free {
            true => 0,
            false => pairs()
                .map(|(c, r, shared)| c.input_ids.len() + if shared { r.completion_len() } else { r.input_ids.len() })
                .max()
                .unwrap_or(0),
        };
        let mut row = PackedRow::default();
        for (i, (c, r, shared)) in pairs().enumerate() {
            if shared {
                row.push_pair(c, r, i, n + i);
            } else {
                row.push_single(c, i);
                row.push_single(r, n + i);
            }
            row.pad_to((i + 1) * width, layout.pad_id);
        }
        row.finish(&seqs, None, device)
    }
}

/// Whether a pair's two sequences can share one copy of the prompt: the same prompt tokens
/// (at least one, so its last token predicts both completions' first).
pub fn shares_prompt(chosen: &TokenizedSequence, rejected: &TokenizedSequence) -> bool {
    chosen.completion_start >= 1
        && chosen.completion_start == rejected.completion_start
        && chosen.prompt_ids() == rejected.prompt_ids()
}

/// A packed row under construction: tokens, spans, and the prediction rows.
#[derive(Default)]
struct PackedRow {
    ids: Vec<u32>,
    spans: Vec<PackedSpan>,
    predict_rows: Vec<u32>,
    targets: Vec<u32>,
    owner: Vec<usize>,
}

impl PackedRow {
    /// Appends sequence `seq` (the batch's sequence number `owner`) as its own span.
    fn push_single(&mut self, s: &TokenizedSequence, owner: usize) {
        let start = self.ids.len();
        self.ids.extend_from_slice(&s.input_ids);
        self.spans.push(PackedSpan::single(start, s.input_ids.len()));
        // Position p predicts token p + 1; completion tokens start at `completion_start`.
        for p in s.completion_start.max(1) - 1..s.input_ids.len().saturating_sub(1) {
            self.predict(start + p, s.input_ids[p + 1], owner);
        }
    }

    /// Appends a pair sharing its prompt (`shares_prompt`) as one span
    /// `[prompt, chosen completion, rejected completion]`.
    fn push_pair(&mut self, c: &TokenizedSequence, r: &TokenizedSequence, chosen: usize, rejected: usize) {
        let start = self.ids.len();
        let prefix = c.completion_start;
        self.push_single(c, chosen);
        self.spans.pop();
        let fork = self.ids.len() - start;
        let completion = &r.input_ids[prefix..];
        self.ids.extend_from_slice(completion);
        self.spans.push(PackedSpan { start, len: fork + completion.len(), prefix, fork });
        // The prompt's last token predicts the first completion token; each completion token
        // the next.
        for (j, &token) in completion.iter().enumerate() {
            let row = if j == 0 { start + prefix - 1 } else { start + fork + j - 1 };
            self.predict(row, token, rejected);
        }
    }

    fn predict(&mut self, row: usize, target: u32, owner: usize) {
        self.predict_rows.push(row as u32);
        self.targets.push(target);
        self.owner.push(owner);
    }

    /// Pads the row with `pad_id` up to `len` tokens, in spans of their own (so no real token
    /// attends to them) of at most `PAD_SPAN` tokens (so their positions stay low).
    fn pad_to(&mut self, len: usize, pad_id: u32) {
        const PAD_SPAN: usize = 64;
        while self.ids.len() < len {
            let (start, n) = (self.ids.len(), (len - self.ids.len()).min(PAD_SPAN));
            self.ids.resize(start + n, pad_id);
            self.spans.push(PackedSpan::single(start, n));
        }
    }

    /// The batch of `seqs`: as `rows` (B, T) padded rows when given (then the spans are only
    /// the rows' own), else one packed row.
    fn finish(
        mut self,
        seqs: &[&TokenizedSequence],
        rows: Option<(usize, usize)>,
        device: &Device,
    ) -> candle_core::Result<SequenceBatch> {
        if self.ids.is_empty() {
            self.pad_to(2, 0);
        }
        let forward_tokens = self.ids.len();
        let (shape, spans) = match rows {
            Some(shape) => (shape, Vec::new()),
            None => ((1, forward_tokens), self.spans),
        };
        Ok(SequenceBatch {
            input_ids: Tensor::from_vec(self.ids, shape, device)?,
            spans,
            predict_rows: self.predict_rows,
            targets: self.targets,
            owner: self.owner,
            completion_lens: seqs.iter().map(|s| s.completion_len()).collect(),
            num_tokens: seqs.iter().map(|s| s.input_ids.len()).sum(),
            forward_tokens,
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
    let h = if batch.spans.is_empty() {
        model.hidden_states(&batch.input_ids, &[], None)?
    } else {
        model.hidden_states_packed(&batch.input_ids, &batch.spans)?
    };
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
    let (h, checkpoints) = model.hidden_states_for_training(
        &batch.input_ids,
        &batch.spans,
        checkpointing == Checkpointing::On,
        dropout,
    )?;
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
    let device = h.device();
    let n = batch.completion_lens.len();
    if batch.predict_rows.is_empty() {
        let zeros = Tensor::zeros(n, DType::F32, device)?;
        return Ok(CompletionLogps { logps: zeros.clone(), logit_sums: zeros, checkpoints });
    }
    let rows = Tensor::new(batch.predict_rows.as_slice(), device)?;
    let picked = h.reshape((b * t, c))?.index_select(&rows, 0)?; // (R, C)
    let logps = segment_sum(&model.token_logps(&picked, &batch.targets)?, &batch.owner, n)?; // (N,)
                                                                                             // A metric only: detached, so it adds nothing to the graph.
    let logit_sums = segment_sum(&model.mean_logits(&picked)?, &batch.owner, n)?;
    Ok(CompletionLogps { logps, logit_sums, checkpoints })
}

/// Summed completion log-probs `(lp(chosen), lp(rejected))` of each pair under `model`, in
/// order: the one scoring path of prefopt (reference log-probs, `prefopt score`, the loop's
/// exact reference, the demo's base model). `batch_size` pairs share a forward pass, laid
/// out as `layout` says (as the trainer's steps are).
/// `progress` hears the number of pairs done after each batch.
pub fn score_pairs(
    model: &Llama,
    pairs: &[&TokenizedPair],
    batch_size: usize,
    layout: BatchLayout,
    mut progress: impl FnMut(usize),
) -> prefopt_model::Result<Vec<(f32, f32)>> {
    let device = model.device();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let chosen: Vec<&TokenizedSequence> = chunk.iter().map(|p| &p.chosen).collect();
        let rejected: Vec<&TokenizedSequence> = chunk.iter().map(|p| &p.rejected).collect();
        let batch = SequenceBatch::pairs(&chosen, &rejected, layout, device)?;
        let lp: Vec<f32> = completion_logps(model, &batch)?.logps.to_vec1()?;
        let n = chunk.len();
        out.extend((0..n).map(|i| (lp[i], lp[n + i])));
        progress(out.len());
    }
    Ok(out)
}
