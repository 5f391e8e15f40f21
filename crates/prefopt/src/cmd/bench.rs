//! `prefopt bench`: throughput of the model's hot paths, printed as one JSON line with the
//! same fields and FLOP estimate as `scripts/bench_torch.py`, so the two compare directly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use prefopt_model::HfModel;
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: `forward` (no gradient) or `fwd-bwd` (next-token loss + backward).
    #[arg(value_parser = ["forward", "fwd-bwd"])]
    mode: String,
    /// Hugging Face model folder (`scripts/bench_torch.py` creates the reference one).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed steps; the median step time is reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// CPU threads (sets RAYON_NUM_THREADS before any tensor work; default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.steps > 0 && args.batch > 0 && args.seq_len > 1, "--steps, --batch must be > 0 and --seq-len > 1");
    if let Some(n) = args.threads {
        // candle reads this on every matmul; set before the first tensor op.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let device = Device::Cpu;
    let hf = HfModel::load(&args.model, &device)?;
    let cfg = hf.config.clone();
    let (b, t) = (args.batch, args.seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let vocab_hi = cfg.vocab_size.min(480) as u32; // ids the fixture tokenizers produce, as the torch script
    let ids: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..vocab_hi)).collect();
    let ids = Tensor::from_vec(ids, (b, t), &device)?;

    let trainable = args.mode == "fwd-bwd";
    let model = hf.build(trainable)?;
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
    for _ in 0..args.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];

    // The torch script's estimate: N = parameters without the input embedding (lm_head counted
    // once), forward = 2*N*T + 4*L*T^2*d per sequence, fwd-bwd = 3x forward.
    let total = hf.params.num_elements();
    let embed = cfg.vocab_size * cfg.hidden_size;
    let n = if cfg.tie_word_embeddings { total } else { total - embed };
    let forward_flops = b as f64 * (2.0 * n as f64 * t as f64 + 4.0 * (cfg.num_hidden_layers * t * t * cfg.hidden_size) as f64);
    let flops = if trainable { 3.0 * forward_flops } else { forward_flops };
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
        "min_step_s": times[0],
        "steps": args.steps,
        "warmup": args.warmup,
        "model": args.model,
    });
    println!("{line}");
    Ok(())
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
