//! Every seed the online loop (and the demo, which runs it) derives from a run's `seed`, in
//! one place, so two stages never draw from the same stream by accident and a number in a
//! report can be traced to the draw that made it. The formulas are fixed: changing one
//! changes every sample of every run after it.

/// Held-out prompts drawn from a built-in task: another seed than the training prompts', so
/// the two sets are independent draws of the same task.
pub fn eval_prompts(seed: u64) -> u64 {
    seed.wrapping_add(1_000_003)
}

/// The sampler of iteration `t`'s training completions.
pub fn iteration_samples(seed: u64, t: usize) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(t as u64)
}

/// The sampler of held-out completions for evaluation seed `seed`: every model evaluated
/// with the same `seed` draws from the same streams, so their comparisons are paired.
pub fn eval_samples(seed: u64) -> u64 {
    seed.wrapping_mul(31).wrapping_add(17)
}

/// The evaluation seed of the loop's trained and extrapolated models. The base model's
/// held-out samples use the run's `seed` itself, so they are paired across iterations and
/// alphas but are not the same draws as the base's (kept as it was, so earlier runs
/// reproduce).
pub fn loop_evaluation(seed: u64) -> u64 {
    seed.wrapping_add(7)
}

/// The ChaCha stream of `prefopt tasks --kind sft`'s answer draws (off-format, wrong),
/// apart from the prompts' streams of the same seed.
pub const SFT_ANSWER_STREAM: u64 = 1000;
