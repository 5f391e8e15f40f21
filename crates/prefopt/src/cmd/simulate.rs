//! `prefopt simulate`: the exact tabular simulator of iterative preference optimization
//! with APO's extrapolation (prefopt-sim). Parses the config, runs the sweep, writes
//! results.jsonl, summary.json, config.toml and PNG plots, and prints a short summary.
//! See docs/simulate.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use prefopt_sim::sweep::{GroupSummary, Spread};
use prefopt_sim::{run_sweep, AlphaSchedule, Config, SweepOutput, DEFAULT_CONFIG_TOML};

use crate::plot::{line_chart, ChartSpec, Legend, Series};

/// Arguments of `prefopt simulate`.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// TOML config (see `--print-config` for every key); without it the built-in
    /// default runs.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output directory (created if missing): results.jsonl, summary.json,
    /// config.toml, *.png.
    #[arg(long, value_name = "DIR", required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// Print the built-in default config as TOML, every key documented, and exit.
    #[arg(long, conflicts_with_all = ["config", "out"])]
    pub print_config: bool,
}

/// Runs `prefopt simulate`.
pub fn run(args: SimulateArgs) -> Result<()> {
    if args.print_config {
        super::print_stdout(DEFAULT_CONFIG_TOML)?;
        return Ok(());
    }
    let out = args.out.context("--out DIR is required")?;
    let (config, config_text) = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
            let config = Config::from_toml_str(&text).with_context(|| format!("config {}", path.display()))?;
            (config, text)
        }
        None => (Config::builtin_default(), DEFAULT_CONFIG_TOML.to_string()),
    };
    let start = Instant::now();
    let sweep = run_sweep(&config)?;
    let sim_secs = start.elapsed().as_secs_f64();

    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut jsonl = String::new();
    let mut lines = 0usize;
    for rec in sweep.records() {
        jsonl.push_str(&serde_json::to_string(rec)?);
        jsonl.push('\n');
        lines += 1;
    }
    prefopt_fs::write_atomic(&out.join("results.jsonl"), jsonl.as_bytes())?;
    let mut summary = serde_json::to_string_pretty(&sweep.summary)?;
    summary.push('\n');
    prefopt_fs::write_atomic(&out.join("summary.json"), summary.as_bytes())?;
    prefopt_fs::write_atomic(&out.join("config.toml"), config_text.as_bytes())?;
    let plots = write_plots(&out, &config, &sweep)?;

    eprint!("{}", human_summary(&config, &sweep, &out, lines, &plots, sim_secs, start.elapsed().as_secs_f64()));
    Ok(())
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.dedup();
    v
}

/// Lowest value drawn on log-scale gap plots: far below anything the metrics resolve
/// is not a concern (they keep relative precision), this only keeps axes finite.
const PLOT_FLOOR: f64 = 1e-300;

fn write_plots(out: &Path, config: &Config, sweep: &SweepOutput) -> Result<Vec<PathBuf>> {
    let gap = sweep.summary.gap_metric.as_str();
    let alphas = sorted(config.alphas.clone());
    let mut ns: Vec<usize> = config.ns.clone();
    ns.sort();
    ns.dedup();
    let mut written = Vec::new();
    for beta in sorted(config.betas.clone()) {
        if config.mode.runs_exact() {
            let mut spec = ChartSpec::new(
                format!("Exact mode (infinite data): {gap} per iteration, beta = {beta}"),
                "iteration t",
                format!("{gap} of the trained policy (log)"),
            )
            .log_y(PLOT_FLOOR)
            .legend(Legend::LowerLeft);
            for &alpha in &alphas {
                let (mean, _) = sweep.gap_band(None, beta, alpha, AlphaSchedule::Constant);
                spec = spec.series(Series::new(format!("alpha = {alpha}"), mean));
            }
            let path = out.join(format!("exact_gap_vs_iteration_beta{beta}.png"));
            line_chart(&path, &spec)?;
            written.push(path);

            let rows: Vec<&GroupSummary> =
                sweep.summary.groups.iter().filter(|g| g.n.is_none() && g.beta == beta).collect();
            let fitted: Vec<(f64, f64)> = rows.iter().filter_map(|g| g.fitted_slope.map(|s| (g.alpha, -s))).collect();
            let late: Vec<(f64, f64)> =
                rows.iter().filter_map(|g| g.late_fitted_slope.map(|s| (g.alpha, -s))).collect();
            // Theory on a fine grid of alpha, so that the curve is smooth.
            let (a0, a1) = (alphas[0], alphas[alphas.len() - 1]);
            let theory: Vec<(f64, f64)> = match sweep.summary.rate_margin {
                Some(m) => {
                    (0..=100).map(|i| a0 + (a1 - a0) * i as f64 / 100.0).map(|a| (a, m / ((1.0 - a) * beta))).collect()
                }
                None => Vec::new(),
            };
            let mut spec = ChartSpec::new(
                format!("Exact mode: decay rate of ln({gap}) vs alpha, beta = {beta}"),
                "alpha",
                "rate (per iteration)",
            )
            .legend(Legend::UpperLeft)
            .series(Series::new("fitted (all t with gap > 1e-12)", fitted).with_markers())
            .series(Series::new("fitted (later half of those t)", late).with_markers());
            if !theory.is_empty() {
                spec = spec.series(Series::new("theory: margin / ((1 - alpha) beta)", theory).dashed());
            }
            let path = out.join(format!("rate_vs_alpha_beta{beta}.png"));
            line_chart(&path, &spec)?;
            written.push(path);
        }
        if config.mode.runs_sampled() {
            for &n in &ns {
                let mut spec = ChartSpec::new(
                    format!("Sampled mode, N = {n}, beta = {beta}: mean over seeds, band 25-75%"),
                    "iteration t",
                    format!("{gap} of the trained policy (log)"),
                )
                .log_y(PLOT_FLOOR)
                .legend(Legend::LowerLeft);
                for &alpha in &alphas {
                    let (mean, band) = sweep.gap_band(Some(n), beta, alpha, AlphaSchedule::Constant);
                    spec = spec.series(Series::new(format!("alpha = {alpha}"), mean).with_band(band));
                }
                let path = out.join(format!("sampled_gap_vs_iteration_n{n}_beta{beta}.png"));
                line_chart(&path, &spec)?;
                written.push(path);
                if let Some(path) = adaptive_plot(out, sweep, n, beta)? {
                    written.push(path);
                }
            }
        }
        let mut spec = ChartSpec::new(
            format!("Final {gap} (iteration {}) vs alpha, beta = {beta}", config.iterations),
            "alpha",
            format!("final {gap} (log; mean, band 25-75% over seeds)"),
        )
        .log_y(PLOT_FLOOR);
        // Sampled runs only when there are any: the exact gaps are many decades
        // smaller and would flatten the sampled curves (they have their own plot).
        let groups: Vec<(String, Option<usize>)> = if config.mode.runs_sampled() {
            ns.iter().map(|&n| (format!("N = {n}"), Some(n))).collect()
        } else {
            vec![("exact (N = inf)".into(), None)]
        };
        for (name, n) in groups {
            let stats: Vec<(f64, (f64, f64, f64))> =
                alphas.iter().map(|&a| (a, sweep.final_gap_band(n, beta, a, AlphaSchedule::Constant))).collect();
            let mean = stats.iter().map(|(a, s)| (*a, s.0)).collect();
            let band = stats.iter().map(|(a, s)| (*a, s.1, s.2)).collect();
            let mut s = Series::new(name, mean).with_markers();
            if n.is_some() {
                s = s.with_band(band);
            }
            spec = spec.series(s);
        }
        let path = out.join(format!("final_gap_vs_alpha_beta{beta}.png"));
        line_chart(&path, &spec)?;
        written.push(path);

        if config.mode.runs_sampled() {
            // The trade-off at a glance: each N's mean final gap relative to its own
            // at the smallest alpha (below 1: momentum helped; above 1: it hurt).
            let mut spec = ChartSpec::new(
                format!("Final {gap} relative to alpha = {}, per N, beta = {beta}", alphas[0]),
                "alpha",
                format!("mean final {gap} / same at alpha = {} (log)", alphas[0]),
            )
            .log_y(PLOT_FLOOR)
            .legend(Legend::LowerLeft);
            for &n in &ns {
                let base = sweep.final_gap_band(Some(n), beta, alphas[0], AlphaSchedule::Constant).0;
                let pts = alphas
                    .iter()
                    .map(|&a| (a, sweep.final_gap_band(Some(n), beta, a, AlphaSchedule::Constant).0 / base))
                    .collect();
                spec = spec.series(Series::new(format!("N = {n}"), pts).with_markers());
            }
            spec = spec
                .series(Series::new("", alphas.iter().map(|&a| (a, 1.0)).collect()).dashed().with_color((90, 90, 90)));
            let path = out.join(format!("final_gap_relative_vs_alpha_beta{beta}.png"));
            line_chart(&path, &spec)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// With adaptive runs: the gap per iteration at N of alpha 0, the best constant alpha, and the
/// largest alpha held constant and under each adaptive rule (where the rules matter most;
/// every alpha's numbers are in summary.json), each with its seed band.
fn adaptive_plot(out: &Path, sweep: &SweepOutput, n: usize, beta: f64) -> Result<Option<PathBuf>> {
    let rows: Vec<_> = sweep.summary.adaptive.iter().filter(|r| r.n == n && r.beta == beta).collect();
    let Some(first) = rows.first() else { return Ok(None) };
    let top = rows.iter().map(|r| r.alpha).fold(f64::NEG_INFINITY, f64::max);
    let gap = sweep.summary.gap_metric.as_str();
    let alpha0 = sweep.summary.tradeoff.iter().find(|t| t.n == n && t.beta == beta).map_or(0.0, |t| t.alphas[0]);
    let mut spec = ChartSpec::new(
        format!("N = {n}, beta = {beta}: constant alpha vs adaptive rules (mean, band 25-75% over seeds)"),
        "iteration t",
        format!("{gap} of the trained policy (log)"),
    )
    .log_y(PLOT_FLOOR)
    .legend(Legend::LowerLeft);
    let mut curves = vec![(format!("alpha = {alpha0} (iterative DPO)"), alpha0, AlphaSchedule::Constant)];
    let best = first.best_constant_alpha;
    if best != alpha0 && best != top {
        curves.push((format!("best constant alpha = {best}"), best, AlphaSchedule::Constant));
    }
    let constant_top =
        if best == top { format!("constant alpha = {top} (the best)") } else { format!("constant alpha = {top}") };
    curves.push((constant_top, top, AlphaSchedule::Constant));
    for r in rows.iter().filter(|r| r.alpha == top) {
        curves.push((format!("{}, alpha = {top}", r.alpha_schedule.as_str()), top, r.alpha_schedule));
    }
    for (name, alpha, schedule) in curves {
        let (mean, band) = sweep.gap_band(Some(n), beta, alpha, schedule);
        spec = spec.series(Series::new(name, mean).with_band(band));
    }
    let path = out.join(format!("adaptive_gap_vs_iteration_n{n}_beta{beta}.png"));
    line_chart(&path, &spec)?;
    Ok(Some(path))
}

fn fmt_spread(s: &Spread) -> String {
    format!("{:.2e} ± {:.1e}", s.mean, s.std)
}

fn human_summary(
    config: &Config,
    sweep: &SweepOutput,
    out: &Path,
    lines: usize,
    plots: &[PathBuf],
    sim_secs: f64,
    total_secs: f64,
) -> String {
    let s = &sweep.summary;
    let mut o = String::new();
    let exact_runs = sweep.runs.iter().filter(|r| r.key.n.is_none()).count();
    let _ = writeln!(
        o,
        "prefopt simulate: loss {}, {} exact + {} sampled runs x {} iterations: simulated in {:.2} s, {:.2} s with outputs",
        s.loss,
        exact_runs,
        sweep.runs.len() - exact_runs,
        config.iterations,
        sim_secs,
        total_secs
    );
    let _ = writeln!(o, "wrote {} ({lines} lines)", out.join("results.jsonl").display());
    let _ = writeln!(o, "      {}, {}", out.join("summary.json").display(), out.join("config.toml").display());
    for p in plots {
        let _ = writeln!(o, "      {}", p.display());
    }
    let margin = s.rate_margin.map(|m| format!("{m}")).unwrap_or_else(|| "none (mixed optimum)".into());
    let _ = writeln!(o, "\ngap = {}, target {:e}, margin = {margin}", s.gap_metric, s.target_gap);
    for beta in sorted(config.betas.clone()) {
        let _ = writeln!(
            o,
            "\nbeta = {beta}: iterations to reach the target (mean ± std over runs that reached it, reached/runs)"
        );
        let cols: Vec<Option<usize>> = {
            let mut c = Vec::new();
            if config.mode.runs_exact() {
                c.push(None);
            }
            if config.mode.runs_sampled() {
                let mut ns = config.ns.clone();
                ns.sort();
                ns.dedup();
                c.extend(ns.into_iter().map(Some));
            }
            c
        };
        let _ = write!(o, "  {:>6}", "alpha");
        for c in &cols {
            let _ = write!(o, " {:>18}", c.map(|n| format!("N = {n}")).unwrap_or_else(|| "exact".into()));
        }
        if config.mode.runs_exact() {
            let _ = write!(o, "   {:>8} {:>8} {:>6} {:>6}", "rate", "theory", "ratio", "late");
        }
        let _ = writeln!(o);
        for alpha in sorted(config.alphas.clone()) {
            let _ = write!(o, "  {alpha:>6}");
            for &c in &cols {
                let g = s
                    .groups
                    .iter()
                    .find(|g| {
                        g.n == c && g.beta == beta && g.alpha == alpha && g.alpha_schedule == AlphaSchedule::Constant
                    })
                    .unwrap();
                let it = &g.iterations_to_target;
                let cell = match (it.iterations, c) {
                    (Some(sp), None) => format!("{}", sp.mean),
                    (Some(sp), Some(_)) => format!("{:.1} ± {:.1} ({}/{})", sp.mean, sp.std, it.reached, it.runs),
                    (None, _) => format!("- (0/{})", it.runs),
                };
                let _ = write!(o, " {cell:>18}");
            }
            if config.mode.runs_exact() {
                let g = s
                    .groups
                    .iter()
                    .find(|g| {
                        g.n.is_none()
                            && g.beta == beta
                            && g.alpha == alpha
                            && g.alpha_schedule == AlphaSchedule::Constant
                    })
                    .unwrap();
                let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
                let _ = write!(
                    o,
                    "   {:>8} {:>8} {:>6} {:>6}",
                    f(g.fitted_slope.map(|v| -v)),
                    f(g.theory_rate),
                    f(g.rate_ratio),
                    f(g.late_rate_ratio)
                );
            }
            let _ = writeln!(o);
        }
        if config.mode.runs_exact() {
            let _ = writeln!(
                o,
                "  (rate: fitted decay of ln(gap) per iteration; theory: margin / ((1 - alpha) beta); ratio = rate / theory;\n   late: the same ratio over the later half of the fit window)"
            );
        }
        for t in s.tradeoff.iter().filter(|t| t.beta == beta) {
            let best = t.alphas.iter().position(|&a| a == t.best_alpha).unwrap();
            let last = t.alphas.len() - 1;
            let verdict = match (t.worse_beyond_alpha, t.holds_across_seeds) {
                (Some(a), true) => format!("final gap gets worse beyond alpha = {a}"),
                (Some(a), false) => {
                    format!("worse beyond alpha = {a} on average only: does not hold across seeds")
                }
                (None, _) => "final gap keeps improving up to the largest alpha".into(),
            };
            let _ = writeln!(
                o,
                "  N = {}: best alpha {} (final gap {}), alpha {}: {}; {verdict} (worse at alpha {} in {}/{} seeds)",
                t.n,
                t.best_alpha,
                fmt_spread(&t.final_gap[best]),
                t.alphas[last],
                fmt_spread(&t.final_gap[last]),
                t.alphas[last],
                t.seeds_worse_at_largest_alpha,
                t.seeds
            );
        }
    }
    if !s.adaptive.is_empty() {
        let _ = writeln!(
            o,
            "\nadaptive alpha_schedule (prefopt's own rules: alpha is 0 at an iteration whose step opposes the momentum \
             (restart), or whose extrapolation is judged worse than the trained model (monotone)),\nfinal gap (mean ± std \
             over seeds) and seeds at least as good, paired by seed:"
        );
        for r in &s.adaptive {
            let _ = writeln!(
                o,
                "  {} N = {}, beta {}, alpha {}: {} (constant {}); >= alpha 0 ({}) in {}/{}, >= best constant alpha {} ({}) in {}/{}; {:.1} restarts per run",
                r.alpha_schedule.as_str(),
                r.n,
                r.beta,
                r.alpha,
                fmt_spread(&r.final_gap),
                fmt_spread(&r.constant_final_gap),
                fmt_spread(&r.alpha0_final_gap),
                r.seeds_at_least_as_good_as_alpha0,
                r.seeds,
                r.best_constant_alpha,
                fmt_spread(&r.best_constant_final_gap),
                r.seeds_at_least_as_good_as_best_constant,
                r.seeds,
                r.restarts_per_run.mean
            );
        }
    }
    let unconverged: usize = s.groups.iter().filter_map(|g| g.unconverged_fits).sum();
    if unconverged > 0 {
        let _ = writeln!(
            o,
            "\nwarning: {unconverged} prompt fits stopped above `tolerance` (see fit_unconverged_prompts in results.jsonl)"
        );
    }
    o
}
