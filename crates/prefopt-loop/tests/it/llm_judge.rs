//! The `llm:` judge against an HTTP server inside the test that speaks
//! `/v1/chat/completions`: the ranking rule over both presentation orders, the strict
//! verdict parser (failures counted, too many stop the stage), retried and fatal server
//! faults, a server that dies mid-stage (the rerun asks only for the rest), and the loop with
//! the judge, with the sampler on the same server too.

use std::path::Path;
use std::time::Duration;

use prefopt_loop::apo::{run_apo, ApoConfig, Sampler};
use prefopt_loop::judge::{
    judge_from_spec_with, Judge, JudgeCall, JudgeEndpoint, JudgeOptions, LlmOptions, PromptItem,
};
use serde_json::{json, Value};

use crate::fake_server::{Reply, Server};
use crate::util::Silent;

/// Response A and B of a request rendered with the default template.
fn responses(request: &Value) -> (String, String) {
    let text = request["messages"][0]["content"].as_str().or(request["prompt"].as_str()).unwrap();
    let between = |start: &str, end: &str| {
        let from = text.find(start).unwrap() + start.len();
        let to = from + text[from..].find(end).unwrap();
        text[from..to].trim().to_string()
    };
    (between("[Response A]\n", "[Response B]"), between("[Response B]\n", "Reply with exactly one word"))
}

fn chat(reply: &str) -> Value {
    json!({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})
}

/// A judge that prefers the longer response and calls equal lengths a tie.
fn longer(request: &Value) -> Reply {
    let (a, b) = responses(request);
    Reply::ok(chat(match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Greater => "A",
        std::cmp::Ordering::Less => "B.",
        std::cmp::Ordering::Equal => " tie\n",
    }))
}

fn options(failure_rate: f64) -> JudgeOptions {
    JudgeOptions {
        llm: LlmOptions {
            model: Some("judge".into()),
            timeout: Duration::from_millis(500),
            retries: 2,
            backoff_s: 0.01,
            concurrency: 3,
            max_failure_rate: failure_rate,
            ..LlmOptions::default()
        },
        ..JudgeOptions::default()
    }
}

fn judge(server: &Server, failure_rate: f64) -> Box<dyn Judge> {
    judge_from_spec_with(&format!("llm:{}", server.url), &candle_core::Device::Cpu, &options(failure_rate)).unwrap()
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

fn scores(
    judge: &mut dyn Judge,
    prompts: &[PromptItem],
    completions: &[Vec<String>],
    journal: Option<&Path>,
) -> Result<Vec<Vec<f64>>, String> {
    let batch: Vec<(&PromptItem, &[String])> =
        prompts.iter().zip(completions).map(|(p, c)| (p, c.as_slice())).collect();
    let judged = judge
        .judge_many_with(&batch, &mut JudgeCall { journal, progress: &mut |_, _| {} })
        .map_err(|e| e.to_string())?;
    Ok(judged.iter().map(|js| js.iter().map(|j| j.score).collect()).collect())
}

#[test]
fn samples_are_ranked_by_their_win_rates_over_both_orders() {
    let server = Server::start(|_, req| longer(req));
    let mut judge = judge(&server, 0.0);
    let prompts = [PromptItem::plain("Say something.")];
    let got = scores(judge.as_mut(), &prompts, &[strings(&["bb", "a", "ccc", "dd"])], None).unwrap();
    // "ccc" beats all 3; "bb" and "dd" beat "a", tie each other and lose to "ccc" (3 of 6
    // points); "a" loses all.
    assert_eq!(got[0], [0.5, 0.0, 1.0, 0.5]);
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 4 * 3, "K (K - 1) requests: every pair in both orders");
    let mut orders: Vec<(String, String)> = requests.iter().map(responses).collect();
    orders.sort();
    orders.dedup();
    assert_eq!(orders.len(), 12, "each ordered pair asked once");
    let r = &requests[0];
    assert_eq!(
        (r["model"].as_str(), r["temperature"].as_f64(), r["max_tokens"].as_u64()),
        (Some("judge"), Some(0.0), Some(8))
    );
    assert!(r["messages"][0]["content"].as_str().unwrap().contains("[Prompt]\nSay something."), "{r}");
    let stats = judge.take_verdict_stats().unwrap();
    assert_eq!((stats.requests, stats.first, stats.second, stats.ties, stats.failures), (12, 5, 5, 2, 0));
    assert_eq!(judge.take_verdict_stats().unwrap().requests, 0, "taken stats start again");
}

#[test]
fn the_completions_endpoint_sends_the_template_as_a_raw_prompt() {
    // A completion's text, as `/v1/completions` answers: " A" or " B".
    let server = Server::start(|_, req| {
        let (a, b) = responses(req);
        Reply::ok(json!({"choices": [{"index": 0, "text": if a.len() > b.len() { " A" } else { " B" }}]}))
    });
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("raw.txt");
    std::fs::write(&template, "{prompt}\n[Response A]\n{response_a}\n[Response B]\n{response_b}\nReply with exactly one word: the better is Response").unwrap();
    let o = options(0.0);
    let raw = JudgeOptions {
        llm: LlmOptions { endpoint: JudgeEndpoint::Completions, template: Some(template), ..o.llm },
        ..options(0.0)
    };
    let mut judge = judge_from_spec_with(&format!("llm:{}", server.url), &candle_core::Device::Cpu, &raw).unwrap();
    let got = scores(judge.as_mut(), &[PromptItem::plain("p")], &[strings(&["a", "bb"])], None).unwrap();
    assert_eq!(got[0], [0.0, 1.0]);
    let first = server.requests.lock().unwrap()[0].clone();
    assert!(
        first.get("messages").is_none() && first["prompt"].as_str().unwrap().starts_with("p\n[Response A]"),
        "{first}"
    );
}

#[test]
fn a_judge_that_always_picks_the_first_place_ranks_nothing() {
    // Position bias alone: both orders cancel it, every sample wins half its verdicts.
    let server = Server::start(|_, _| Reply::ok(chat("A")));
    let mut judge = judge(&server, 0.0);
    let got = scores(judge.as_mut(), &[PromptItem::plain("p")], &[strings(&["x", "yy", "zzz"])], None).unwrap();
    assert_eq!(got[0], [0.5, 0.5, 0.5]);
    assert_eq!(judge.take_verdict_stats().unwrap().first, 6);
}

#[test]
fn replies_that_are_not_a_verdict_are_counted_and_too_many_stop_the_stage() {
    // Every request whose response A is "a" gets a sentence, not a verdict.
    let server = Server::start(|_, req| match responses(req).0.as_str() {
        "a" => Reply::ok(chat("Response A is better because")),
        _ => longer(req),
    });
    let prompts = [PromptItem::plain("p")];
    let completions = [strings(&["a", "bb", "ccc"])];
    let mut lenient = judge(&server, 0.5);
    let got = scores(lenient.as_mut(), &prompts, &completions, None).unwrap();
    // "a" is judged only where it is shown second (it loses both); the failures count nowhere.
    assert_eq!(got[0], [0.0, 1.0 / 3.0, 1.0]);
    let stats = lenient.take_verdict_stats().unwrap();
    assert_eq!((stats.requests, stats.failures), (6, 2));
    let e = scores(judge(&server, 0.1).as_mut(), &prompts, &completions, None).unwrap_err();
    assert!(e.contains("2 of 6 replies are not a verdict (A, B or tie)"), "{e}");
    assert!(e.contains("judge_max_failure_rate = 0.1") && e.contains("\"Response A is better because\""), "{e}");
}

#[test]
fn server_faults_are_retried_or_named() {
    let prompts = [PromptItem::plain("p")];
    let two = [strings(&["a", "bb"])];
    // A 500 and a 429 with Retry-After, then good answers.
    let flaky = Server::start(|n, req| match n {
        0 => Reply::status(500, "busy"),
        1 => Reply { headers: vec![("Retry-After", "0".into())], ..Reply::status(429, "slow down") },
        _ => longer(req),
    });
    let got = scores(judge(&flaky, 0.0).as_mut(), &prompts, &two, None).unwrap();
    assert_eq!(got[0], [0.0, 1.0]);
    assert_eq!(flaky.count(), 4);

    let garbled = Server::start(|_, _| Reply::status(200, "<html>gateway</html>"));
    let e = scores(judge(&garbled, 0.0).as_mut(), &prompts, &two, None).unwrap_err();
    assert!(e.contains(&format!("{}/chat/completions", garbled.url)), "{e}");
    assert!(e.contains("not chat completion JSON") && e.contains("<html>gateway") && e.contains("comparison"), "{e}");

    let missing = Server::start(|_, _| Reply::status(404, "{\"error\": \"model judge not found\"}"));
    // One request at a time, so the count does not depend on whether the second comparison
    // started before the first one's error stopped the stage.
    let one_at_a_time = JudgeOptions { llm: LlmOptions { concurrency: 1, ..options(0.0).llm }, ..options(0.0) };
    let mut serial =
        judge_from_spec_with(&format!("llm:{}", missing.url), &candle_core::Device::Cpu, &one_at_a_time).unwrap();
    let e = scores(serial.as_mut(), &prompts, &two, None).unwrap_err();
    assert!(e.contains("HTTP 404") && e.contains("model judge not found"), "{e}");
    assert_eq!(missing.count(), 1, "a 404 is not retried, and stops the stage");

    let slow = Server::start(|_, req| Reply { delay: Duration::from_secs(2), ..longer(req) });
    let e = scores(judge(&slow, 0.0).as_mut(), &prompts, &two, None).unwrap_err();
    assert!(e.contains("gave up after 3 attempts"), "{e}");
}

#[test]
fn a_server_dying_mid_stage_loses_no_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let journal = tmp.path().join("samples.verdicts.partial.jsonl");
    let prompts: Vec<PromptItem> = (0..3).map(|i| PromptItem::plain(format!("prompt {i}"))).collect();
    let completions: Vec<Vec<String>> = (0..3).map(|_| strings(&["a", "bb", "ccc"])).collect();
    let dying = std::sync::Arc::new(std::sync::OnceLock::<Server>::new());
    let handle = dying.clone();
    let server = Server::start(move |n, req| {
        if n == 9 {
            handle.get().unwrap().kill();
            return Reply::status(500, "dying");
        }
        longer(req)
    });
    let url = server.url.clone();
    let _ = dying.set(server);
    let one_at_a_time = JudgeOptions { llm: LlmOptions { concurrency: 1, ..options(0.0).llm }, ..options(0.0) };
    let mut first = judge_from_spec_with(&format!("llm:{url}"), &candle_core::Device::Cpu, &one_at_a_time).unwrap();
    let e = scores(first.as_mut(), &prompts, &completions, Some(&journal)).unwrap_err();
    assert!(e.contains("comparison 9 (prompt 1, sample 1 as A, 2 as B)"), "{e}");
    assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 9);

    let healthy = Server::start(|_, req| longer(req));
    let resumed = scores(judge(&healthy, 0.0).as_mut(), &prompts, &completions, Some(&journal)).unwrap();
    assert_eq!(healthy.count(), 18 - 9, "only the unanswered comparisons are asked again");
    let fresh = Server::start(|_, req| longer(req));
    assert_eq!(resumed, scores(judge(&fresh, 0.0).as_mut(), &prompts, &completions, None).unwrap());
    // Another template, another request: a journalled reply is not reused for it.
    let other = Server::start(|_, req| longer(req));
    let template = tmp.path().join("template.txt");
    std::fs::write(
        &template,
        "{prompt}\n[Response A]\n{response_a}\n[Response B]\n{response_b}\nReply with exactly one word",
    )
    .unwrap();
    let with_template =
        JudgeOptions { llm: LlmOptions { template: Some(template), ..options(0.0).llm }, ..options(0.0) };
    let mut j = judge_from_spec_with(&format!("llm:{}", other.url), &candle_core::Device::Cpu, &with_template).unwrap();
    scores(j.as_mut(), &prompts, &completions, Some(&journal)).unwrap();
    assert_eq!(other.count(), 18);
}

#[test]
fn the_loop_samples_and_judges_on_servers_and_evaluates_against_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    // One server for both: completions are deterministic by seed, verdicts prefer the longer.
    let server = Server::start(|_, req| {
        if req.get("messages").is_some() {
            return longer(req);
        }
        let (n, seed) = (req["n"].as_u64().unwrap(), req["seed"].as_u64().unwrap());
        let choices: Vec<Value> =
            (0..n).map(|j| json!({"index": j, "text": "x".repeat(((seed + j) % 5 + 1) as usize)})).collect();
        Reply::ok(json!({"choices": choices}))
    });
    let out = tmp.path().join("apo");
    let cfg = ApoConfig {
        judge: format!("llm:{}", server.url),
        judge_model: Some("judge".into()),
        judge_backoff_s: 0.01,
        sampler: Sampler::Openai,
        sampler_url: Some(server.url.clone()),
        sampler_backoff_s: 0.01,
        iterations: 2,
        ..crate::apo_loop::config(&out, 0.3)
    };
    let manifest = run_apo(&cfg, &mut Silent).unwrap_or_else(|e| panic!("{e}"));
    for r in &manifest.iterations {
        let stats = r.judge_verdicts.as_ref().unwrap();
        // 4 prompts, K = 3: 6 requests each.
        assert_eq!((stats.requests, stats.failures), (24, 0), "{stats:?}");
        let pairs: Vec<Value> =
            std::fs::read_to_string(&r.pairs).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        for p in &pairs {
            assert!(p["chosen"].as_str().unwrap().len() > p["rejected"].as_str().unwrap().len(), "{p}");
        }
        assert!(!r.samples.with_extension("verdicts.partial.jsonl").exists(), "the journal is removed when done");
        for dir in [&r.trained, &r.extrapolated] {
            assert!(!dir.with_extension("eval-verdicts.partial.jsonl").exists(), "{}", dir.display());
        }
        let eval = r.eval_trained.as_ref().unwrap();
        assert!((0.0..=1.0).contains(&eval.eval_reward) && eval.num_prompts == 5, "{eval:?}");
    }
    let base = manifest.base_eval.unwrap();
    assert_eq!((base.eval_reward, base.win_rate_vs_base), (0.5, 0.5));
    // Held-out evaluation compares each model sample with the base's (both orders).
    let compared = server.requests.lock().unwrap().iter().filter(|r| r.get("messages").is_some()).count();
    let trained_and_extrapolated = 2 * 2 * 5 * 2;
    assert_eq!(compared, 2 * 24 + trained_and_extrapolated);
}

#[test]
fn configs_name_what_an_llm_judge_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg =
        ApoConfig { judge: "llm:http://127.0.0.1:9/v1".into(), ..crate::apo_loop::config(&tmp.path().join("a"), 0.3) };
    let e = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("needs `judge_model`"), "{e}");
    let cfg = ApoConfig { judge_model: Some("j".into()), judge_max_failure_rate: 2.0, ..cfg };
    let e = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("`judge_max_failure_rate` must be in [0, 1]"), "{e}");
    let cfg = ApoConfig { judge_max_failure_rate: 0.1, judge_template: Some(tmp.path().join("none.txt")), ..cfg };
    let e = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("none.txt"), "{e}");
}
