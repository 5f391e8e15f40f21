//! The `prefopt` binary end to end, one test binary (one link step) with a module per
//! command and shared helpers in `util`.

mod apo;
mod bad_input;
mod demo;
mod device;
mod examples;
/// The OpenAI-protocol test server of prefopt-loop's tests.
#[path = "../../../prefopt-loop/tests/it/fake_server.rs"]
mod fake_server;
mod generate;
mod hub;
mod lora;
mod reward;
mod score;
mod simulate;
mod tfevents;
mod train;
mod util;
