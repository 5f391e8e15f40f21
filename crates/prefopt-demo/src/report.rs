//! `report.md`: what was run, a table per experiment (mean ± standard deviation over seeds,
//! with the range), and which differences hold on every seed. Written from the summary only,
//! so no number in it is typed by hand.

use std::fmt::Write;

use prefopt_loop::apo::AlphaSchedule;

use crate::summary::{methods, rows_of, RunRow, Spread, Summary};

/// The plot files the report links (drawn by the CLI next to it).
pub const PLOT_ONLINE_ACCURACY: &str = "online_accuracy.png";
pub const PLOT_ONLINE_REWARD: &str = "online_reward.png";
pub const PLOT_OFFLINE_LOGPS: &str = "offline_logps.png";

fn cell(values: &[f64], digits: usize) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let s = Spread::of(values);
    if s.n == 1 {
        format!("{:.digits$}", s.mean)
    } else {
        format!("{:.digits$} ± {:.digits$} [{:.digits$}, {:.digits$}]", s.mean, s.std, s.min, s.max)
    }
}

fn column(rows: &[&RunRow], f: impl Fn(&RunRow) -> Option<f64>) -> Vec<f64> {
    rows.iter().filter_map(|r| f(r)).collect()
}

pub fn render(s: &Summary) -> String {
    let r = &s.recipe;
    let mut md = String::new();
    let seeds = r.seeds.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
    let _ = writeln!(md, "# prefopt demo report\n");
    let _ = writeln!(
        md,
        "Written by `prefopt demo` from `summary.json`; every number below comes from this run \
         ({:.0} s of wall-clock time in the invocation that finished it).\n",
        s.wall_s
    );
    let _ = writeln!(md, "## What was run\n");
    let _ = writeln!(
        md,
        "- Task `{}` (built-in oracle: exact answer, partial credit, malformed answers score 0). \
         Base model: the shipped 0.8M-parameter Llama (`scripts/make_base_model.sh`).",
        r.task
    );
    let _ = writeln!(
        md,
        "- Seeds {seeds}. Each seed draws its own prompts, samples, data order and {} held-out prompts \
         (one sample each, temperature {}, top-p {}).",
        r.num_eval_prompts, r.temperature, r.top_p
    );
    let _ = writeln!(
        md,
        "- Offline: {} prompts x {} base-model samples, best vs worst by the oracle (ties skipped): one \
         preference set per seed. Methods {} train on it from the base model with the same budget \
         (shared keys below, with `{}`).",
        r.offline_prompts,
        r.num_samples,
        r.offline_methods.iter().map(|m| format!("`{}`", m.name)).collect::<Vec<_>>().join(", "),
        toml_inline(&r.offline_train)
    );
    let _ = writeln!(
        md,
        "- Online: {} iterations x {} prompts x {} samples, DPO (beta {}) with the current policy as \
         reference; methods {} (alpha 0 is iterative DPO, the others APO with parameter extrapolation; \
         `-restart` drops the momentum at an iteration whose step opposes it, `-monotone` when the \
         extrapolated model's samples of the next prompts are judged worse than the trained model's: \
         prefopt's own rules, docs/apo.md \"Adaptive momentum\").",
        r.iterations,
        r.prompts_per_iteration,
        r.num_samples,
        r.beta,
        r.online_methods
            .iter()
            .map(|m| format!("`{}` (alpha {}, {})", m.name, m.alpha, m.alpha_schedule.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "- Training keys shared by every run: `{}`.\n", toml_inline(&r.train));
    let _ = writeln!(md, "Cells: mean ± standard deviation over seeds [min, max].\n");

    let _ = writeln!(md, "## Base model\n");
    let _ = writeln!(
        md,
        "Held-out accuracy {:.3}, reward {:.3}, malformed rate {:.3} (mean over the seeds' held-out sets).\n",
        s.base.eval_accuracy, s.base.eval_reward, s.base.malformed_rate
    );

    let _ = writeln!(md, "## Offline: SPO against plain preference losses\n");
    let _ = writeln!(
        md,
        "| method | accuracy | reward | malformed rate | Δ log-prob chosen | Δ log-prob rejected |\n|---|---|---|---|---|---|"
    );
    for m in methods(&s.runs, "offline") {
        let rows = rows_of(&s.runs, "offline", &m, None);
        let _ = writeln!(
            md,
            "| {m} | {} | {} | {} | {} | {} |",
            cell(&column(&rows, |r| r.eval_accuracy), 3),
            cell(&column(&rows, |r| Some(r.eval_reward)), 3),
            cell(&column(&rows, |r| Some(r.malformed_rate)), 3),
            cell(&column(&rows, |r| r.logp_chosen_delta), 2),
            cell(&column(&rows, |r| r.logp_rejected_delta), 2),
        );
    }
    let _ = writeln!(
        md,
        "\nΔ log-prob: change of the mean summed log-prob (nats) of the preference set's chosen \
         (rejected) responses from the base model to the trained one.\n\n![log-probs]({PLOT_OFFLINE_LOGPS})\n"
    );

    let _ = writeln!(md, "## Online: APO against iterative DPO\n");
    let _ = writeln!(
        md,
        "Iteration 1 is the same run for every method: momentum enters with the first extrapolation, \
         after it. As in the APO paper's Table 1, both models of each iteration are evaluated: the \
         trained model `pi_hat_t` (the algorithm's output) and the extrapolated model \
         `pi_t = pi_hat_t + alpha (pi_hat_t - pi_hat_t-1)` (the next iteration's sampler and \
         reference); at alpha 0 they are the same model.\n"
    );
    let _ = writeln!(md, "Held-out accuracy of the trained model `pi_hat_t` after each iteration (0 = base):\n");
    online_table(&mut md, s, |r| r.eval_accuracy);
    let _ = writeln!(md, "\nHeld-out reward of `pi_hat_t`:\n");
    online_table(&mut md, s, |r| Some(r.eval_reward));
    let _ = writeln!(md, "\nMalformed rate of `pi_hat_t`:\n");
    online_table(&mut md, s, |r| Some(r.malformed_rate));
    let _ = writeln!(md, "\nHeld-out accuracy of the extrapolated model `pi_t`:\n");
    online_table(&mut md, s, |r| if r.iteration == Some(0) { r.eval_accuracy } else { r.extrapolated_eval_accuracy });
    let _ = writeln!(md, "\nHeld-out reward of `pi_t`:\n");
    online_table(&mut md, s, |r| if r.iteration == Some(0) { Some(r.eval_reward) } else { r.extrapolated_eval_reward });
    adaptive_drops(&mut md, s);
    let _ = writeln!(md, "\n![accuracy]({PLOT_ONLINE_ACCURACY})\n![reward]({PLOT_ONLINE_REWARD})\n");

    let _ = writeln!(md, "## What holds across seeds\n");
    let _ = writeln!(md, "A claim holds only if it holds on every seed; the difference column is per seed.\n");
    let _ = writeln!(md, "| claim | seeds where it held | holds across seeds | difference |\n|---|---|---|---|");
    for c in &s.claims {
        let d = c.difference;
        let _ = writeln!(
            md,
            "| {} | {}/{} | {} | {:+.3} ± {:.3} [{:+.3}, {:+.3}] |",
            c.statement,
            c.held,
            c.seeds,
            if c.holds_across_seeds { "**yes**" } else { "no" },
            d.mean,
            d.std,
            d.min,
            d.max
        );
    }
    let failed: Vec<&str> = s.claims.iter().filter(|c| !c.holds_across_seeds).map(|c| c.statement.as_str()).collect();
    if failed.is_empty() {
        let _ = writeln!(md, "\nEvery claim above held on every seed.");
    } else {
        let _ = writeln!(md, "\nNot established by this run (did not hold on every seed):\n");
        for f in failed {
            let _ = writeln!(md, "- {f}");
        }
    }
    md
}

fn online_table(md: &mut String, s: &Summary, f: impl Fn(&RunRow) -> Option<f64> + Copy) {
    let its = s.recipe.iterations;
    let _ = write!(md, "| method |");
    for t in 0..=its {
        let _ = write!(md, " iter {t} |");
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(its + 1));
    for m in methods(&s.runs, "online") {
        let _ = write!(md, "| {m} |");
        for t in 0..=its {
            let _ = write!(md, " {} |", cell(&column(&rows_of(&s.runs, "online", &m, Some(t)), f), 3));
        }
        let _ = writeln!(md);
    }
}

/// For each adaptive method: how often the rule dropped the momentum, per seed.
fn adaptive_drops(md: &mut String, s: &Summary) {
    for m in s.recipe.online_methods.iter().filter(|m| m.alpha > 0.0 && m.alpha_schedule != AlphaSchedule::Constant) {
        let rows: Vec<&RunRow> = s
            .runs
            .iter()
            .filter(|r| r.experiment == "online" && r.method == m.name && r.alpha_used.is_some())
            .collect();
        // The restart rule needs two trained models, so it acts from iteration 2 on.
        let first = if m.alpha_schedule == AlphaSchedule::Restart { 2 } else { 1 };
        let eligible = rows.iter().filter(|r| r.iteration.unwrap_or(0) >= first).count();
        let dropped = |seed: u64| -> Vec<String> {
            rows.iter()
                .filter(|r| r.seed == seed && r.alpha_used == Some(0.0))
                .map(|r| r.iteration.unwrap_or(0).to_string())
                .collect()
        };
        let per_seed: Vec<String> = s
            .recipe
            .seeds
            .iter()
            .filter_map(|&seed| {
                let d = dropped(seed);
                (!d.is_empty()).then(|| format!("seed {seed} after iteration {}", d.join(", ")))
            })
            .collect();
        let fired: usize = s.recipe.seeds.iter().map(|&seed| dropped(seed).len()).sum();
        let _ = writeln!(
            md,
            "\n`{}`: the {} rule dropped the momentum at {fired} of {eligible} extrapolations it could act on{}.",
            m.name,
            m.alpha_schedule.as_str(),
            if per_seed.is_empty() { String::new() } else { format!(" ({})", per_seed.join("; ")) }
        );
    }
}

fn toml_inline(t: &toml::Table) -> String {
    t.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
}
