//! `examples/prometheus.rs`: the three layers inside an axum proxy that serves Prometheus
//! `/metrics`, scraped over real sockets while jobs flow through it.

#![cfg(feature = "metrics")]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/prometheus.rs"]
mod example;

/// The value of the sample `name{labels}` in a scrape, 0 if it is not there yet.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counters_on_metrics_move_as_jobs_flow_through_the_proxy() {
    let metrics = example::install_recorder();
    let config = sync_mock::Config::default().time_scale(example::SCALE);
    let api = sync_mock::MockServer::start(config).await.unwrap();
    let stack = example::client_stack(&api.url(""), sync_mock::DEFAULT_KEY).unwrap();
    let app = example::App {
        stack,
        api: api.url(""),
        metrics,
    };
    let proxy = example::serve(app).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let scrape = || {
        let client = client.clone();
        async move {
            let request = http::Request::get(format!("http://{proxy}/metrics"))
                .body(Full::default())
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        }
    };
    let create = |n: usize| {
        let client = client.clone();
        async move {
            let body = r#"{"model":"lipsync-2","input":[{"type":"video","url":"v"},{"type":"audio","url":"a"}]}"#;
            let mut jobs = Vec::new();
            for _ in 0..n {
                let request = http::Request::post(format!("http://{proxy}/generate"))
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap();
                let client = client.clone();
                jobs.push(tokio::spawn(async move {
                    let response = client.request(request).await.unwrap();
                    let status = response.status();
                    response.into_body().collect().await.unwrap();
                    status
                }));
            }
            for job in jobs {
                assert!(job.await.unwrap().is_success());
            }
        }
    };
    let admitted = r#"tower_quota_requests_admitted_total{layer="sync",route="POST /v2/generate"}"#;
    let taken = r#"tower_quota_plan_slots_taken_total{layer="sync"}"#;
    let bound = r#"tower_quota_jobs_bound_total{layer="sync"}"#;
    let limit = r#"tower_quota_plan_slots_limit{layer="sync"}"#;

    let before = scrape().await;
    assert_eq!(sample(&before, admitted), 0.0);

    create(2).await;
    let after_two = scrape().await;
    assert_eq!(sample(&after_two, admitted), 2.0, "{after_two}");
    assert_eq!(sample(&after_two, taken), 2.0);
    assert_eq!(sample(&after_two, bound), 2.0);
    assert_eq!(sample(&after_two, limit), 3.0, "Creator: 3 jobs at once");
    assert!(after_two.contains("# TYPE tower_quota_requests_admitted_total counter"));
    assert!(after_two.contains(
        "tower_quota_wait_seconds_bucket{layer=\"sync\",route=\"POST /v2/generate\",le=\"0\"}"
    ));

    // Five more: the plan holds three at once, so some wait for a slot, and the watch's
    // status polls count under the default route.
    create(5).await;
    let after_seven = scrape().await;
    assert_eq!(sample(&after_seven, admitted), 7.0, "{after_seven}");
    assert_eq!(sample(&after_seven, taken), 7.0);
    assert!(
        sample(
            &after_seven,
            r#"tower_quota_plan_waited_total{layer="sync"}"#
        ) >= 1.0
    );
    assert!(
        sample(
            &after_seven,
            r#"tower_quota_requests_admitted_total{layer="sync",route="default"}"#
        ) >= 1.0,
        "the watch polls the jobs' statuses"
    );
    assert!(
        sample(
            &after_seven,
            r#"tower_quota_plan_slots_freed_total{layer="sync",by="status"}"#
        ) >= 4.0,
        "{after_seven}"
    );
}
