//! The backplane of `examples/custom-backplane.rs` (NATS core, written with
//! the public API only) against switchboard's conformance suite, on a
//! private `nats-server`.

mod support;

#[allow(dead_code)]
#[path = "../examples/custom-backplane.rs"]
mod example;

use example::NatsBackplane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_backplane_of_the_example_conforms() {
    let server = support::nats::NatsServer::start().await;
    let a = NatsBackplane::connect(&server.url()).await.expect("connect");
    let b = NatsBackplane::connect(&server.url()).await.expect("connect");
    // The example's bound: its relay queue and async-nats's own buffer.
    let bound = 2 * example::CAPACITY + 100;
    switchboard::testing::BackplaneSuite::new(a, b)
        .subscription_capacity(bound)
        .cut_connection(server.restarter())
        .run()
        .await
        .unwrap();
}
