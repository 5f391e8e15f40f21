//! `prefopt bench`: throughput of the model's hot paths, printed as one JSON line with the
//! same fields and FLOP estimate as `scripts/bench_torch.py`, so the two compare directly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use prefopt_model::{HfModel, LoraAdapter, Mode, Precision, TargetModules};
use prefopt_train::weights::Weights;
use rand::{Rng, SeedableRng};

use super::{DeviceArg, LayoutArg};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: `forward` (no gradient), `fwd-bwd` (next-token loss + backward),
    /// `dpo` (a whole DPO step: reference forward, policy forward+backward, AdamW), or
    /// `generate` (sampling with a KV cache: --batch prompts of --prompt-len tokens, exactly
    /// --new-tokens new tokens each, temperature 1, no top-k/top-p).
    #[arg(value_parser = ["forward", "fwd-bwd", "dpo", "generate"])]
    mode: String,
    /// Hugging Face model folder or `org/name[@revision]` in the local cache
    /// (`scripts/bench_torch.py` creates the reference one).
    #[arg(long, value_parser = super::model_dir)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed steps; the median step time is reported (default 10; generate 3, as the torch script).
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed steps first (default 2; generate 1).
    #[arg(long)]
    warmup: Option<usize>,
    /// CPU threads (default: RAYON_NUM_THREADS or all cores); `main` applies it before any tensor work.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// dpo: pairs per step (each pair is two sequences: chosen and rejected).
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// dpo and generate: prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// dpo: completion tokens per sequence.
    #[arg(long, default_value_t = 64)]
    completion_len: usize,
    /// generate: new tokens per sequence.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// dpo: reference log-probs come from the cache (`precompute_ref_log_probs`), so the
    /// step runs no reference forward pass.
    #[arg(long)]
    cached_ref: bool,
    /// dpo: bf16-rounded weights with f32 master weights (the `bf16` training key).
    #[arg(long)]
    bf16: bool,
    /// dpo: recompute each decoder block in the backward pass (the `gradient_checkpointing`
    /// training key).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// dpo: train a fresh LoRA adapter on the frozen model (the `use_peft` key); the
    /// reference is the frozen base, as PEFT's disabled adapter.
    #[arg(long)]
    lora: bool,
    /// dpo --lora: the rank (`lora_r`).
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// dpo --lora: `lora_alpha`.
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// dpo --lora: module names, comma-separated, or all-linear (`lora_target_modules`).
    #[arg(long, default_value = "all-linear")]
    lora_target_modules: String,
    /// dpo --lora: `lora_dropout`.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// dpo: time steps on the pairs of this preference file (JSONL or Parquet, TRL's formats;
    /// `prefopt workload` writes a ragged one), tokenized with the model's tokenizer, instead
    /// of fixed-length random pairs; each step takes the next --pairs of them.
    #[arg(long)]
    data: Option<PathBuf>,
    /// dpo --data: the `max_length` key (prompt + completion tokens; the end is cut).
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    #[command(flatten)]
    layout: LayoutArg,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    let generating = args.mode == "generate";
    args.steps = Some(args.steps.unwrap_or(if generating { 3 } else { 10 }));
    args.warmup = Some(args.warmup.unwrap_or(if generating { 1 } else { 2 }));
    anyhow::ensure!(
        args.steps > Some(0) && args.batch > 0 && args.seq_len > 1 && args.new_tokens > 0 && args.prompt_len > 0,
        "--steps, --batch, --new-tokens, --prompt-len must be > 0 and --seq-len > 1"
    );
    let device = args.device.device()?;
    let hf = HfModel::load(&args.model, &device)?;
    let cfg = hf.config.clone();
    let (b, t) = (args.batch, args.seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let vocab_hi = cfg.vocab_size.min(480) as u32; // ids the fixture tokenizers produce, as the torch script
    let ids: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..vocab_hi)).collect();
    let ids = Tensor::from_vec(ids, (b, t), &device)?;

    if args.mode == "dpo" {
        return bench_dpo(&args, hf, &device, &mut rng);
    }
    if generating {
        return bench_generate(&args, &hf, &mut rng);
    }
    let trainable = args.mode == "fwd-bwd";
    let mode = if trainable { Mode::Train } else { Mode::Infer };
    let model = hf.build(mode, Precision::F32)?;
    let step = || -> Result<()> {
        let logits = model.forward(&ids)?;
        if trainable {
            let v = cfg.vocab_size;
            let flat = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
            let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
            let loss = candle_nn::loss::cross_entropy(&flat, &targets)?;
            std::hint::black_box(loss.backward()?);
        } else {
            std::hint::black_box(logits.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(())
    };
    let Times { median, min, .. } = time_steps(args.warmup.unwrap_or(0), args.steps.unwrap_or(1), step)?;

    // The torch script's estimate: N = parameters without the input embedding (lm_head counted
    // once), forward = 2*N*T + 4*L*T^2*d per sequence, fwd-bwd = 3x forward.
    let forward = b as f64 * forward_flops(&hf, t);
    let flops = if trainable { 3.0 * forward } else { forward };
    let line = serde_json::json!({
        "impl": "prefopt",
        "mode": args.mode,
        "tokens_per_s": (b * t) as f64 / median,
        "peak_rss_mb": peak_rss_mb(),
        "gflops": flops / 1e9 / median,
        "gflop_per_step": flops / 1e9,
        "threads": candle_core::utils::get_num_threads(),
        "batch": b,
        "seq_len": t,
        "median_step_s": median,
        "min_step_s": min,
        "steps": args.steps.unwrap_or(1),
        "warmup": args.warmup.unwrap_or(0),
        "model": args.model,
    });
    super::print_stdout(&format!("{line}\n"))?;
    Ok(())
}

/// One DPO training step as `prefopt train` runs it (the trainer's own objective and step:
/// shards of pairs forward and backward at once, sigmoid loss, metrics, AdamW), plus, unless
/// `--cached-ref`, the reference forward pass that PyTorch's step runs every time (sharded
/// the same way). On fixed-length random pairs, or with `--data` on the pairs of a file, each
/// step taking the next `--pairs` of them (cycling).
fn bench_dpo(
    args: &BenchArgs,
    hf: HfModel,
    device: &candle_core::Device,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<()> {
    use prefopt_train::optim::{Optimizer, OptimizerConfig};
    use prefopt_train::trainer::{accumulate_step, run_sharded};
    use prefopt_train::{score_pairs, PreferenceObjective, TrainConfig};

    let p = args.pairs;
    let (data, pad_id) = match &args.data {
        Some(path) => {
            let tok = prefopt_data::HfTokenizer::from_dir(&args.model)?;
            let opts = prefopt_data::TokenizeOptions { max_length: Some(args.max_length), ..Default::default() };
            (prefopt_train::dataset::PairDataset::load(path, &tok, &opts)?, tok.padding_id())
        }
        None => (random_pairs(args, hf.config.vocab_size, rng), 0),
    };
    let n = data.len();
    let targets = match args.lora_target_modules.as_str() {
        "all-linear" => TargetModules::Preset("all-linear".into()),
        list => TargetModules::Names(list.split(',').map(|s| s.trim().to_string()).collect()),
    };
    let cfg = TrainConfig {
        batch_size: p,
        bf16: args.bf16,
        gradient_checkpointing: args.gradient_checkpointing,
        padding_free: args.layout.padding_free,
        share_prompt: args.layout.share_prompt,
        use_peft: args.lora,
        lora_r: Some(args.lora_r),
        lora_alpha: Some(args.lora_alpha),
        lora_dropout: Some(args.lora_dropout),
        lora_target_modules: Some(targets),
        seed: args.seed,
        ..TrainConfig::default()
    };
    let layout = cfg.batch_layout(pad_id);
    // What each step does: its pairs' tokens, and the FLOPs of running them.
    let flops = StepFlops::new(&hf);
    let weights = if args.lora {
        let adapter = LoraAdapter::init(&hf.config, cfg.fresh_lora_config()?, cfg.seed, device)?;
        Weights::Lora { base: hf.into(), adapter }
    } else {
        Weights::Full(hf)
    };
    // Full training: the reference over its own copy of the weights (the policy trains them
    // in place), as PyTorch's step holds a policy and a reference model. LoRA: the frozen
    // base itself, as PEFT's disabled adapter.
    let reference = match &weights {
        Weights::Full(hf) => {
            prefopt_model::Llama::new(&hf.config, &hf.params.deep_clone()?, Mode::Infer, cfg.precision())?
        }
        Weights::Lora { base, .. } => base.network(Mode::Frozen, cfg.precision())?,
    };
    let pairs = data.pairs.clone();
    // Reference log-probs of `indices` written into the full table (the others keep theirs).
    let reference_logps = |indices: &[usize], table: &mut Vec<(f32, f32)>| -> Result<(), prefopt_train::TrainError> {
        let cost = |i: usize| pairs[i].num_tokens();
        let shards = run_sharded(indices, cost, |shard| {
            let mine: Vec<_> = shard.iter().map(|&i| &pairs[i]).collect();
            let scores = score_pairs(&reference, &mine, mine.len(), layout, |_| {})?;
            Ok(shard.iter().copied().zip(scores).collect::<Vec<_>>())
        })?;
        for (i, lp) in shards.into_iter().flatten() {
            table[i] = lp;
        }
        Ok(())
    };
    let (warmup, steps) = (args.warmup.unwrap_or(0), args.steps.unwrap_or(1));
    let batch_of = |k: usize| -> Vec<usize> { (0..p).map(|j| (k * p + j) % n).collect() };
    // The pairs the run uses (all of them after a wrap), scored once up front; without
    // --cached-ref each step scores its own again, as PyTorch's step does.
    let mut table = vec![(0f32, 0f32); n];
    let used: Vec<usize> = (0..((warmup + steps) * p).min(n)).collect();
    reference_logps(&used, &mut table)?;
    let mut objective = PreferenceObjective::new(&cfg, data, Some(table.clone()), pad_id);
    let policy = weights.network(Mode::Train, cfg.precision())?;
    let trainable = weights.trainable();
    let mut optimizer = Optimizer::new(OptimizerConfig::default(), trainable)?;
    let mut step_number = 0;
    let step = || -> Result<()> {
        let indices = batch_of(step_number);
        if !args.cached_ref {
            reference_logps(&indices, &mut table)?;
            objective.set_reference(table.clone());
        }
        let seed = prefopt_train::trainer::step_dropout_seed(cfg.seed, step_number);
        step_number += 1;
        let acc = accumulate_step(&mut objective, &policy, trainable, &indices, cfg.batch_size, seed)?;
        optimizer.step(trainable, &acc.grads, 1e-6)?;
        Ok(())
    };
    let times = time_steps(warmup, steps, step)?;
    // The timed steps' work: sequences' tokens (a prompt once per sequence, as PyTorch runs
    // it), unique tokens (a pair's prompt once), and FLOPs both ways.
    let passes = if args.cached_ref { 3.0 } else { 4.0 }; // policy fwd+bwd = 3, reference fwd = 1
    let (mut tokens, mut unique, mut separate_flops, mut useful_flops) = (0usize, 0usize, 0f64, 0f64);
    let mut first_step_useful_flops = 0f64;
    for k in warmup..warmup + steps {
        for i in batch_of(k) {
            let pair = pair_tokens(&pairs, i);
            tokens += pair.0 + pair.1;
            unique += pair.0 + pair.1 - pair.2;
            separate_flops += passes * (flops.sequence(pair.0) + flops.sequence(pair.1));
            useful_flops += passes * flops.shared_pair(pair.2, pair.0 - pair.2, pair.1 - pair.2);
        }
        if k == warmup {
            first_step_useful_flops = useful_flops;
        }
    }
    // The steps after the first: their own work over their own time.
    let steady_useful_gflops =
        times.steady.map(|s| (useful_flops - first_step_useful_flops) / 1e9 / (s * (steps - 1) as f64));
    let total = times.total;
    let mut line = serde_json::json!({
        "impl": "prefopt",
        "mode": "dpo",
        "examples_per_s": (p * steps) as f64 / total,
        "tokens_per_s": tokens as f64 / total,
        "unique_tokens_per_s": unique as f64 / total,
        "peak_rss_mb": peak_rss_mb(),
        "gflops": separate_flops / 1e9 / total,
        "useful_gflops": useful_flops / 1e9 / total,
        "gflop_per_step": separate_flops / 1e9 / steps as f64,
        "threads": candle_core::utils::get_num_threads(),
        "pairs": p,
        "padding_free": layout.padding_free,
        "share_prompt": layout.share_prompt,
        "cached_ref": args.cached_ref,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora": args.lora.then(|| serde_json::json!({
            "r": args.lora_r, "alpha": args.lora_alpha, "target_modules": args.lora_target_modules,
            "dropout": args.lora_dropout, "trainable_params": trainable.num_elements(),
        })),
        "median_step_s": times.median,
        "min_step_s": times.min,
        "steady_step_s": times.steady,
        "steady_examples_per_s": times.steady.map(|s| p as f64 / s),
        "steady_useful_gflops": steady_useful_gflops,
        "steps": steps,
        "warmup": warmup,
        "model": args.model,
    });
    let fields = match &args.data {
        Some(path) => {
            // The whole file's mean lengths, as tokenized (a fixed-length run's yardstick).
            let prompt: usize = pairs.iter().map(|x| x.chosen.completion_start).sum();
            let completions: usize =
                pairs.iter().map(|x| x.chosen.completion_len() + x.rejected.completion_len()).sum();
            serde_json::json!({"data": path, "max_length": args.max_length,
                "mean_tokens_per_pair": tokens as f64 / (p * steps) as f64,
                "mean_prompt_tokens": prompt as f64 / n as f64,
                "mean_completion_tokens": completions as f64 / (2 * n) as f64})
        }
        None => serde_json::json!({"prompt_len": args.prompt_len, "completion_len": args.completion_len,
            "seq_len": args.prompt_len + args.completion_len}),
    };
    if let (Some(line), serde_json::Value::Object(more)) = (line.as_object_mut(), fields) {
        line.extend(more);
    }
    super::print_stdout(&format!("{line}\n"))?;
    Ok(())
}

/// A pair's (chosen tokens, rejected tokens, shared prompt tokens): the prompt counts once
/// when the two sequences can share it (`logps::shares_prompt`).
fn pair_tokens(pairs: &[prefopt_data::TokenizedPair], i: usize) -> (usize, usize, usize) {
    let (c, r) = (&pairs[i].chosen, &pairs[i].rejected);
    let shared = if prefopt_train::logps::shares_prompt(c, r) { c.completion_start } else { 0 };
    (c.input_ids.len(), r.input_ids.len(), shared)
}

/// `--pairs` fixed-length random pairs: a prompt of `--prompt-len` tokens and two completions
/// of `--completion-len`.
fn random_pairs(
    args: &BenchArgs,
    vocab: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> prefopt_train::dataset::PairDataset {
    use prefopt_data::{TokenizedPair, TokenizedSequence};
    let (p, a, c) = (args.pairs, args.prompt_len, args.completion_len);
    let vocab_hi = vocab.min(480) as u32;
    let mut random = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab_hi)).collect() };
    let prompts: Vec<Vec<u32>> = (0..p).map(|_| random(a)).collect();
    let mut completion = |prompt: &[u32]| TokenizedSequence::new([prompt, &random(c)].concat(), a);
    let chosen: Vec<TokenizedSequence> = prompts.iter().map(|x| completion(x)).collect();
    let pairs: Vec<TokenizedPair> = prompts
        .iter()
        .zip(chosen)
        .map(|(x, chosen)| TokenizedPair { prompt_ids: x.clone(), chosen, rejected: completion(x) })
        .collect();
    prefopt_train::dataset::PairDataset {
        path: "<bench>".into(),
        pairs,
        sources: vec!["<bench>".into(); p],
        dropped: 0,
        rows: (0..p).collect(),
        ref_logps: None,
        win_probs: None,
        boundary_moved: 0,
    }
}

/// Sampling as `prefopt generate` runs it: one batch of distinct random prompts, a KV cache,
/// exactly `new_tokens` new tokens per sequence (no stop ids), temperature 1, no filtering.
fn bench_generate(args: &BenchArgs, hf: &HfModel, rng: &mut rand_chacha::ChaCha8Rng) -> Result<()> {
    use prefopt_model::{generate, sample_rng, SamplingParams};

    let (b, a, n) = (args.batch, args.prompt_len, args.new_tokens);
    let vocab_hi = hf.config.vocab_size.min(480) as u32;
    let prompts: Vec<Vec<u32>> = (0..b).map(|_| (0..a).map(|_| rng.gen_range(0..vocab_hi)).collect()).collect();
    let model = hf.build(Mode::Infer, Precision::F32)?;
    let params = SamplingParams { max_new_tokens: n, ..SamplingParams::default() };
    let mut call = 0u64;
    let step = || -> Result<()> {
        call += 1;
        let mut rngs: Vec<_> = (0..b as u64).map(|i| sample_rng(args.seed + call, i)).collect();
        let out = generate(&model, &prompts, &params, &mut rngs)?;
        anyhow::ensure!(out.iter().all(|g| g.tokens.len() == n), "a sequence ended early");
        Ok(())
    };
    let Times { median, min, .. } = time_steps(args.warmup.unwrap_or(0), args.steps.unwrap_or(1), step)?;
    // The torch script's estimate: prefill of the prompts, then per new token 2*N plus
    // attention over the tokens in the cache.
    let cfg = &hf.config;
    let non_embedding = forward_flops(hf, 1) - 4.0 * (cfg.num_hidden_layers * cfg.hidden_size) as f64;
    let decode: f64 =
        (0..n).map(|i| non_embedding + 4.0 * (cfg.num_hidden_layers * (a + i + 1) * cfg.hidden_size) as f64).sum();
    let flops = b as f64 * (forward_flops(hf, a) + decode);
    let line = serde_json::json!({
        "impl": "prefopt",
        "mode": "generate",
        "tokens_per_s": (b * n) as f64 / median,
        "peak_rss_mb": peak_rss_mb(),
        "gflops": flops / 1e9 / median,
        "gflop_per_step": flops / 1e9,
        "threads": candle_core::utils::get_num_threads(),
        "batch": b,
        "prompt_len": a,
        "new_tokens": n,
        "median_step_s": median,
        "min_step_s": min,
        "steps": args.steps.unwrap_or(1),
        "warmup": args.warmup.unwrap_or(0),
        "model": args.model,
    });
    super::print_stdout(&format!("{line}\n"))?;
    Ok(())
}

/// Step times of a benchmark, in seconds.
struct Times {
    median: f64,
    min: f64,
    /// All timed steps together.
    total: f64,
    /// The mean of the timed steps after the first (TRL's script's `steady_step_s`): what a
    /// long run's steps cost once the first one has faulted in its memory. None for one step.
    steady: Option<f64>,
}

/// Runs `warmup` untimed then `steps` timed calls.
fn time_steps(warmup: usize, steps: usize, mut step: impl FnMut() -> Result<()>) -> Result<Times> {
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(Times::of(times))
}

impl Times {
    /// The summary of step times in the order they ran (at least one).
    fn of(mut times: Vec<f64>) -> Self {
        let total = times.iter().sum();
        let steady = (times.len() > 1).then(|| times[1..].iter().sum::<f64>() / (times.len() - 1) as f64);
        times.sort_by(f64::total_cmp);
        Times { median: times[times.len() / 2], min: times[0], total, steady }
    }
}

/// The torch script's FLOP estimate for one sequence of `t` tokens: 2*N*T + 4*L*T^2*d, with
/// N the parameters without the input embedding (the lm_head counted once).
fn forward_flops(hf: &HfModel, t: usize) -> f64 {
    StepFlops::new(hf).sequence(t)
}

/// Forward FLOPs of sequences under the torch script's estimate (see [`forward_flops`]).
struct StepFlops {
    /// 2 N: per token.
    per_token: f64,
    /// 4 L d: per (query, key) pair of the attention (not halved for causality, as the script).
    per_attention_pair: f64,
}

impl StepFlops {
    fn new(hf: &HfModel) -> Self {
        let cfg = &hf.config;
        let total = hf.params.num_elements();
        let n = if cfg.tie_word_embeddings { total } else { total - cfg.vocab_size * cfg.hidden_size };
        Self { per_token: 2.0 * n as f64, per_attention_pair: 4.0 * (cfg.num_hidden_layers * cfg.hidden_size) as f64 }
    }

    /// One sequence of `t` tokens.
    fn sequence(&self, t: usize) -> f64 {
        self.per_token * t as f64 + self.per_attention_pair * (t * t) as f64
    }

    /// A pair with its prompt of `p` tokens counted once: the prompt, then completions of `c`
    /// and `r` tokens, each attending to the prompt and itself.
    fn shared_pair(&self, p: usize, c: usize, r: usize) -> f64 {
        let pairs = (p + c) * (p + c) + (p + r) * (p + r) - p * p;
        self.per_token * (p + c + r) as f64 + self.per_attention_pair * pairs as f64
    }
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::Times;

    #[test]
    fn steady_state_is_the_mean_of_the_steps_after_the_first() {
        // The first step is the slow one (it faults in the step's memory); the order matters.
        let t = Times::of(vec![9.0, 2.0, 4.0]);
        assert_eq!((t.median, t.min, t.total, t.steady), (4.0, 2.0, 15.0, Some(3.0)));
        let t = Times::of(vec![2.0, 9.0, 4.0]);
        assert_eq!(t.steady, Some(6.5));
        assert_eq!(Times::of(vec![5.0]).steady, None);
    }
}
