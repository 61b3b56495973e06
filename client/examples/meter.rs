//! Meters inference requests with the provider SDK.
//!
//! ```text
//! TRIBUTE_CLI_TOKEN=trb_… cargo run -p tribute-client --example meter -- \
//!     http://127.0.0.1:50051 llm-a 100
//! ```
//!
//! Sends 100 requests one call each (64 in flight over the SDK's connection pool), then
//! the same ids again on one `MeterStream` — which the daemon answers from its idempotency
//! log (`replayed`), accruing nothing twice.

use futures::StreamExt;
use std::process::ExitCode;
use tribute_client::{DaemonEndpoint, Meter, Provider, ProviderConfig};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let model = args.next().unwrap_or_else(|| "llm-a".into());
    let count: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(100);
    let token = std::env::var("TRIBUTE_CLI_TOKEN")
        .map_err(|_| "set TRIBUTE_CLI_TOKEN to a provider token")?;

    let provider = Provider::connect(ProviderConfig::new(DaemonEndpoint::new(url), token)).await?;
    let run_id = std::process::id();
    let requests: Vec<Meter> = (0..count)
        .map(|i| Meter::usage(&format!("example-{run_id}-{i}"), &model, 100 + i, 20))
        .collect::<Result<_, _>>()?;

    // One call per request, 64 in flight.
    let mut pool_nsat = 0u128;
    let mut answers = futures::stream::iter(requests.clone())
        .map(|m| {
            let p = provider.clone();
            async move { p.meter(&m).await }
        })
        .buffer_unordered(64);
    while let Some(answer) = answers.next().await {
        pool_nsat += answer?.pool_nsat.0;
    }
    println!("metered {count} requests, contributors' pool {pool_nsat} nsat");

    // The same requests on a stream: all replayed.
    let mut replayed = 0u64;
    let mut stream = provider.meter_stream(futures::stream::iter(requests));
    while let Some(answer) = stream.next().await {
        replayed += u64::from(answer?.replayed);
    }
    println!("sent them again on one stream: {replayed} of {count} replayed, none accrued twice");
    Ok(())
}
