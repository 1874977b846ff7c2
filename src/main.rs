//! The `cellgate` binary: parses the command line and dispatches. No logic of its own.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use cellgate::cli::{self, Cli, Command, MapCommand};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Map(MapCommand::Check { files }) => cli::map_check(&files),
        Command::Map(MapCommand::Diff { old, new }) => cli::map_diff(&old, &new),
        Command::Map(MapCommand::Synth { cells, shards, resolution, fallback_resolution, cities, out }) => {
            cli::map_synth(cells, shards, resolution, fallback_resolution, &cities, &out)
        }
        Command::Locate(args) => cli::locate(&args),
    }
}
