//! The `cellgate` binary: parses the command line and dispatches. No logic of its own.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: a request allocates and frees dozens of small buffers
/// across threads (body, JSON tree, key parts, answer); docs/performance.md has the measurement.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cellgate::cli::{self, Cli, Command, DemoCommand, FleetCommand, MapCommand};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Map(MapCommand::Check { files }) => cli::map_check(&files),
        Command::Map(MapCommand::Diff { old, new }) => cli::map_diff(&old, &new),
        Command::Map(MapCommand::Push {
            file,
            admin,
            token,
            if_version,
            etcd,
            prefix,
            wait,
            etcd_timeout_ms,
            etcd_access,
        }) => match admin {
            Some(admin) => cli::map_push(&file, &admin, token.as_deref(), if_version),
            None => cli::map_push_etcd(
                &file,
                &etcd,
                prefix.as_deref().unwrap_or_default(),
                if_version,
                wait.as_deref(),
                etcd_timeout_ms,
                &etcd_access,
            ),
        },
        Command::Fleet(FleetCommand::Status { etcd, prefix, etcd_timeout_ms, etcd_access }) => {
            cli::fleet_status(&etcd, &prefix, etcd_timeout_ms, &etcd_access)
        }
        Command::Map(MapCommand::Synth { cells, shards, resolution, fallback_resolution, cities, out }) => {
            cli::map_synth(cells, shards, resolution, fallback_resolution, &cities, &out)
        }
        Command::Locate(args) => cli::locate(&args),
        Command::Demo(DemoCommand::Load { map, cities, db, musicians, venues, gig_requests, seed, schema }) => {
            cli::demo_load(
                &map,
                &cities,
                &db,
                cellgate::demo::DemoSpec { musicians, venues, gig_requests, seed },
                schema.as_ref(),
            )
        }
        Command::Migrate { admin, token, token_file, action } => match cli::admin_token(token, token_file.as_deref()) {
            Ok(token) => cli::migrate(&admin, token.as_deref(), &action),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Healthcheck { admin, timeout_ms } => {
            cli::healthcheck(&admin, std::time::Duration::from_millis(timeout_ms))
        }
        Command::TokenHash { token } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut line = String::new();
                    if let Err(e) = std::io::stdin().read_line(&mut line) {
                        eprintln!("error: reading the token from stdin: {e}");
                        return ExitCode::FAILURE;
                    }
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if token.is_empty() {
                eprintln!("error: empty token (give it as an argument or on stdin)");
                return ExitCode::from(2);
            }
            println!("{}", cellgate::auth::digest_hex(&token));
            ExitCode::SUCCESS
        }
        Command::Serve { config, insecure_no_auth, log_format } => {
            cellgate::telemetry::init_logging(log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(cellgate::server::run(&config, insecure_no_auth)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
