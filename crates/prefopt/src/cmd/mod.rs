//! One module per subcommand: argument struct + `run`.

pub mod score;
pub mod simulate;
