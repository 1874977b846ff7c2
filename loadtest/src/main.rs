//! cellgate-loadtest: goose load test of cellgate's data plane with the marketplace traffic mix
//! (see loadtest/README.md). Loopback targets only, bounded runs; exit code 1 on any failure.

mod args;
mod cache;
mod scenarios;
mod summary;
mod world;

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use goose::client::GooseClientBuilder;
use goose::config::GooseConfiguration;
use goose::prelude::*;

use crate::scenarios::Shared;
use crate::world::{Cities, Ids};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("cellgate-loadtest: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<ExitCode, String> {
    let (own, goose_args) = args::split(std::env::args().skip(1).collect())?;
    if own.help {
        println!("{}", args::HELP);
        let mut goose_help = <GooseConfiguration as clap::CommandFactory>::command();
        let printed = if goose_args.iter().any(|a| a == "--help") {
            goose_help.print_long_help()
        } else {
            goose_help.print_help()
        };
        // A closed pipe (`| head`) is not an error.
        let _ = printed;
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = GooseConfiguration::parse_args_default(&goose_args).map_err(|e| match e {
        GooseError::InvalidOption { option, value, detail } => format!("{option} {value}: {detail}"),
        e => e.to_string(),
    })?;

    // Safety rules and this tool's defaults.
    let host = config.host.get_or_insert_with(|| args::DEFAULT_HOST.to_string()).clone();
    args::check_loopback(&host)?;
    args::check_bounded(config.run_time.as_deref())?;
    let bounded_otherwise = own.test_plan || config.iterations.is_some_and(|n| n > 0);
    if config.run_time.is_none() && !bounded_otherwise {
        config.run_time = Some(args::DEFAULT_RUN_TIME.to_string());
    }
    // No telnet controller (fixed port 5116): runs in CI must not collide. goose starts the
    // WebSocket controller only with --websocket.
    config.no_telnet = true;
    if !bounded_otherwise {
        // Failures while users start count too.
        config.no_reset_metrics = true;
    }

    let token = match own.token.or_else(|| std::env::var(args::TOKEN_ENV).ok()) {
        Some(token) if !token.is_empty() => token,
        _ => return Err(format!("no token: pass --token or set {}", args::TOKEN_ENV)),
    };
    let csv = std::fs::read_to_string(&own.cities).map_err(|e| format!("--cities {}: {e}", own.cities))?;
    let cities = cellgate::demo::read_cities(&csv).map_err(|e| format!("--cities {}: {e}", own.cities))?;
    let cities = Cities::new(cities).map_err(|e| format!("--cities {}: {e}", own.cities))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    eprintln!("cellgate-loadtest: {} cities, target {host}, seed {}", cities.len(), own.seed);
    scenarios::init(Shared { token, cities, ids: Ids::new(now), seed: own.seed });

    let client = GooseClientBuilder::new()
        .without_cookies()
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("cellgate-loadtest/", env!("CARGO_PKG_VERSION")));
    let metrics = GooseAttack::initialize_with_config(config)
        .and_then(|attack| attack.set_client_builder_without_cookies(client))
        .and_then(|attack| {
            Ok(attack.set_scheduler(GooseScheduler::Random).register_scenario(scenarios::marketplace()?))
        })
        .map_err(|e| e.to_string())?
        .execute()
        .await;
    let metrics = match metrics {
        Ok(metrics) => metrics,
        // A failed --threshold still ran the load test: report it, then fail.
        Err(GooseError::ThresholdsFailed { metrics, .. }) => {
            let summary = summary::summarize(&metrics, cache::COUNTS.snapshot());
            println!("{}", summary.line());
            eprintln!("cellgate-loadtest: a --threshold failed");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.to_string()),
    };
    let summary = summary::summarize(&metrics, cache::COUNTS.snapshot());
    println!("{}", summary.line());
    Ok(if summary.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
