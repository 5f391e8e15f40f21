//! prefopt-train's integration tests, one binary with a module per area and shared helpers in
//! `util`. `PREFOPT_TEST_DEVICE=cuda` runs the training trajectories on a GPU (a build with
//! the `cuda` feature); the default is the CPU.

mod deep;
mod kto;
mod layout;
mod lora;
mod reward;
mod trajectory;
mod util;
