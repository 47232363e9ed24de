//! `--metrics ADDR`: the hub's metrics in the Prometheus text format at
//! `http://ADDR/metrics`, on a listener of its own (keep it off the public
//! port: bind a private address).

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::integration::axum::ServeConfig;
use switchboard::Hub;

/// Installs the Prometheus recorder (before the hub records anything),
/// describes switchboard's metrics, binds `addr` and serves `/metrics`
/// in the background. The gauges are sampled from the hub at each scrape.
pub async fn serve(addr: SocketAddr, hub: Hub) -> std::io::Result<()> {
    let handle = recorder();
    switchboard::metrics::describe();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("chat metrics on http://{}/metrics", listener.local_addr()?);
    // Histograms keep their samples until upkeep folds them in; a scrape
    // also does, this bounds the memory between scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let router = Router::new().route(
        "/metrics",
        get(move || {
            switchboard::metrics::sample(&hub);
            std::future::ready(handle.render())
        }),
    );
    // The same safe serving as the public port (head and body timeouts,
    // connection caps at accept), so a scraper gone wrong cannot hold it.
    let serve = switchboard::integration::axum::serve(listener, router, ServeConfig::default());
    tokio::spawn(async move { serve.await });
    Ok(())
}

/// The recorder, with histogram buckets (not summaries) so that
/// quantiles can be aggregated across instances (`histogram_quantile`).
fn recorder() -> PrometheusHandle {
    const SECONDS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
    const BYTES: &[f64] = &[1024.0, 8192.0, 65536.0, 262144.0, 1048576.0, 4194304.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES))
        .expect("buckets are not empty")
        .install_recorder()
        .expect("no other recorder is installed")
}
