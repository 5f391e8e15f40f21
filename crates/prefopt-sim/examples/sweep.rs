//! Runs a sweep from a TOML file (or the built-in default) and prints the summary
//! tables, without the CLI: `cargo run --release -p prefopt-sim --example sweep -- [sim.toml]`.

use prefopt_sim::{run_sweep, Config};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = match std::env::args().nth(1) {
        Some(path) => Config::from_toml_str(&std::fs::read_to_string(&path)?)?,
        None => Config::builtin_default(),
    };
    let start = std::time::Instant::now();
    let out = run_sweep(&config)?;
    let s = &out.summary;
    println!(
        "{} runs in {:.2?}; gap = {}, margin = {:?}",
        out.runs.len(),
        start.elapsed(),
        s.gap_metric,
        s.rate_margin
    );
    println!(
        "mode     n     beta  alpha  reached  iters(mean±std)  final_gap(mean±std)      rate   theory  ratio  unconv"
    );
    for g in &s.groups {
        let it = g
            .iterations_to_target
            .iterations
            .map(|i| format!("{:5.1}±{:4.1}", i.mean, i.std))
            .unwrap_or("    -     ".into());
        println!(
            "{:7} {:5} {:5.2} {:5.2}  {:2}/{:2}    {}      {:9.3e}±{:9.3e}  {:7.3} {:7.3} {:6.3} {:?}",
            g.mode,
            g.n.map(|n| n.to_string()).unwrap_or("inf".into()),
            g.beta,
            g.alpha,
            g.iterations_to_target.reached,
            g.iterations_to_target.runs,
            it,
            g.final_gap.mean,
            g.final_gap.std,
            g.fitted_slope.map(|v| -v).unwrap_or(f64::NAN),
            g.theory_rate.unwrap_or(f64::NAN),
            g.rate_ratio.unwrap_or(f64::NAN),
            g.unconverged_fits,
        );
    }
    for t in &s.tradeoff {
        println!(
            "tradeoff n={} beta={}: best alpha {} worse beyond {:?}; seeds worse at largest {}/{}",
            t.n, t.beta, t.best_alpha, t.worse_beyond_alpha, t.seeds_worse_at_largest_alpha, t.seeds
        );
    }
    Ok(())
}
