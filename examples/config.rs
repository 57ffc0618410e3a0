//! The three layers from a TOML file (feature `serde`): `examples/limits.toml`, or the file
//! named on the command line.
//!
//! ```sh
//! cargo run --example config --features serde
//! cargo run --example config --features serde -- my-limits.toml
//! ```

use tower_quota::config::Config;
use tower_quota::BoxError;

fn main() -> Result<(), BoxError> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/examples/limits.toml").into());
    let text = std::fs::read_to_string(&path).map_err(|error| format!("{path}: {error}"))?;
    // A misspelt key or a value that does not read names its place in the file; a setting
    // that makes no sense is the builder's error, naming the route or setting.
    let config: Config = toml::from_str(&text).map_err(|error| format!("{path}: {error}"))?;
    let (limits, plan, backoff) = config.build()?;

    if let Some(limits) = limits {
        for route in limits.snapshot() {
            println!("rate limit  {:<24} {}", route.route, route.quota);
        }
    }
    if let Some(plan) = plan {
        println!(
            "plan        {} ({} jobs at once)",
            plan.plan(),
            plan.plan().limit()
        );
    }
    if let Some(backoff) = backoff {
        println!("backoff     {backoff:?}");
    }
    // The layers go on a client as in every other example:
    // ServiceBuilder::new().layer(backoff).layer(plan).layer(limits).service(client)
    Ok(())
}
