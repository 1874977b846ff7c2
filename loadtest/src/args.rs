//! The command line: cellgate-loadtest's own options are taken out first, everything else is
//! goose's (`--host`, `--users`, `--increase-rate`, `--run-time`, `--report-file`, ...). Then the
//! safety rules: loopback targets only, and a bounded run.

use std::net::IpAddr;

/// The cities CSV of the workspace (GeoNames cities15000), found from the build's source tree.
pub const DEFAULT_CITIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/cities15000.csv");
/// The demo's data plane (`deploy/local/demo.sh` without `--data-port`).
pub const DEFAULT_HOST: &str = "http://127.0.0.1:8080";
/// The run time when neither `--run-time`, `--iterations` nor `--test-plan` bounds the run.
pub const DEFAULT_RUN_TIME: &str = "60s";
pub const TOKEN_ENV: &str = "CELLGATE_TOKEN";

pub const HELP: &str = "\
cellgate-loadtest: the marketplace traffic mix against cellgate's data plane (loopback only)

Options of cellgate-loadtest (every other option is goose's, listed below):
  --token TOKEN    bearer token with the read and write scopes [env: CELLGATE_TOKEN]
  --cities FILE    cities CSV, users are placed by population [default: tests/data/cities15000.csv
                   of the workspace]
  --seed N         seed of the users' PRNGs [default: 1]

Defaults that differ from goose's: --host http://127.0.0.1:8080, --run-time 60s (unless
--iterations or --test-plan bounds the run), metrics kept from the ramp up (no reset), request
timeout 10 s, no telnet controller. The host must be a loopback address. The run
ends with one summary line; the exit code is 1 if any request or transaction failed.
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own {
    pub token: Option<String>,
    pub cities: String,
    pub seed: u64,
    /// `-h` / `--help` was given: print [`HELP`] before goose's help.
    pub help: bool,
    /// `--test-plan` was given (goose keeps it private): it bounds the run and forbids
    /// `--run-time` and `--no-reset-metrics`.
    pub test_plan: bool,
}

/// Split the arguments (without the program name) into ours and goose's.
pub fn split(args: Vec<String>) -> Result<(Own, Vec<String>), String> {
    let mut own = Own { token: None, cities: DEFAULT_CITIES.to_string(), seed: 1, help: false, test_plan: false };
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| match inline.clone() {
            Some(v) => Ok(v),
            None => it.next().ok_or_else(|| format!("{name} needs a value")),
        };
        match flag.as_str() {
            "--token" => own.token = Some(value("--token")?),
            "--cities" => own.cities = value("--cities")?,
            "--seed" => {
                let v = value("--seed")?;
                own.seed = v.parse().map_err(|_| format!("--seed: not a number: {v:?}"))?;
            }
            _ => {
                if arg == "-h" || arg == "--help" {
                    own.help = true;
                }
                if flag == "--test-plan" {
                    own.test_plan = true;
                }
                rest.push(arg);
            }
        }
    }
    Ok((own, rest))
}

/// The host part of a URL such as `http://127.0.0.1:8080/` or `http://[::1]:8080`.
fn host_of(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if let Some(bracketed) = authority.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

/// Load tests target only this machine: `localhost`, 127.0.0.0/8 or ::1.
pub fn check_loopback(url: &str) -> Result<(), String> {
    let host = host_of(url);
    let loopback = host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback { Ok(()) } else { Err(format!("--host {url:?}: load tests may only target loopback addresses")) }
}

/// Seconds of a goose TIME (`30`, `30s`, `2m30s`, `1h`), or `None` if goose would have to judge it.
pub fn seconds(time: &str) -> Option<u64> {
    if let Ok(secs) = time.parse() {
        return Some(secs);
    }
    let (mut total, mut number) = (0u64, String::new());
    for c in time.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(number.parse::<u64>().ok()?.checked_mul(unit)?)?;
        number.clear();
    }
    number.is_empty().then_some(total)
}

/// A run time of 0 means "until stopped" to goose: not allowed here.
pub fn check_bounded(run_time: Option<&str>) -> Result<(), String> {
    match run_time.map(|t| (t, seconds(t))) {
        Some((t, Some(0))) => Err(format!("--run-time {t:?}: the run must be bounded (more than 0 s)")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn own_options_are_taken_out() {
        let (own, rest) = split(strings(&[
            "-u",
            "20",
            "--token",
            "t1",
            "--cities=c.csv",
            "--seed",
            "9",
            "-t",
            "30s",
            "--test-plan",
            "1,1s",
        ]))
        .unwrap();
        assert_eq!(own.token.as_deref(), Some("t1"));
        assert_eq!(own.cities, "c.csv");
        assert_eq!(own.seed, 9);
        assert!(own.test_plan && !own.help);
        assert_eq!(rest, strings(&["-u", "20", "-t", "30s", "--test-plan", "1,1s"]));
        assert!(split(strings(&["--token"])).is_err());
        assert!(split(strings(&["--seed", "x"])).is_err());
        assert!(split(strings(&["--help"])).unwrap().0.help);
    }

    #[test]
    fn only_loopback_hosts() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1/",
            "https://[::1]:8443/x",
            "127.0.0.2:80",
            "http://u:p@127.0.0.1",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://[2001:db8::1]:80",
            "http://127.0.0.1.example.com",
            "",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_times() {
        assert_eq!(seconds("30"), Some(30));
        assert_eq!(seconds("2m30s"), Some(150));
        assert_eq!(seconds("1h"), Some(3600));
        assert_eq!(seconds("0s"), Some(0));
        assert_eq!(seconds("1x"), None);
        assert_eq!(seconds("5m3"), None);
        assert!(check_bounded(Some("0")).is_err());
        assert!(check_bounded(Some("0h0m")).is_err());
        assert!(check_bounded(Some("30s")).is_ok());
        assert!(check_bounded(None).is_ok());
    }
}
