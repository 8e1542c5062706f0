//! The notification service against the real system: one customer notification per completed
//! or failed order, from `saga-events`; the same event delivered again notifies once; an
//! unreadable event is dead-lettered and the next one is still handled; bad queries get a 400.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use saga_e2e::faults::{self, Kind};
use saga_e2e::System;
use serde_json::Value;

async fn notifications(system: &System, order_id: &str) -> anyhow::Result<Vec<Value>> {
    let url = system.url("notification", &format!("/api/v1/notifications?order_id={order_id}"));
    let response = system.http.get(url).send().await?;
    ensure!(response.status() == 200, "GET notifications: {}", response.status());
    let page: Value = response.json().await?;
    Ok(page["items"].as_array().context("items")?.clone())
}

/// Waits until `order_id` has `count` notifications.
async fn wait_for(system: &System, order_id: &str, count: usize) -> anyhow::Result<Vec<Value>> {
    let started = Instant::now();
    loop {
        let items = notifications(system, order_id).await?;
        if items.len() >= count {
            return Ok(items);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "order {order_id}: {} notifications after 30 s, expected {count}\n{}",
                items.len(),
                system.diagnostics().await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn every_completed_or_failed_order_notifies_its_customer_once() -> anyhow::Result<()> {
    let system = System::start().await?;
    faults::stock_up(&system, &["NOTE-A"], 100).await?;
    let good = faults::place(&system, "note-good", Kind::Good, "NOTE-A", 1).await?;
    let declined = faults::place(&system, "note-declined", Kind::Declined, "NOTE-A", 1).await?;
    faults::settle(&system, &[good.clone(), declined.clone()], Duration::from_secs(60)).await?;

    let confirmed = wait_for(&system, &good.order_id.to_string(), 1).await?;
    assert_eq!(confirmed[0]["kind"], "ORDER_CONFIRMED", "{confirmed:#?}");
    assert_eq!(confirmed[0]["saga_id"], good.saga_id.to_string());
    let failed = wait_for(&system, &declined.order_id.to_string(), 1).await?;
    assert_eq!(failed[0]["kind"], "ORDER_FAILED", "{failed:#?}");
    assert!(failed[0]["body"].as_str().unwrap_or("").contains("declined"), "{failed:#?}");

    // Every event of the topic delivered again, and an unreadable one between them.
    let events = system.read_topic("saga-events").await?;
    ensure!(events.len() >= 4, "started and ended events of both sagas: {}", events.len());
    system.publish("saga-events", "garbage", Some(b"{not json"), &[]).await?;
    for event in &events {
        let headers: Vec<(&str, &str)> = event.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        system.publish("saga-events", event.key.as_deref().unwrap_or(""), event.payload.as_deref(), &headers).await?;
    }
    // The duplicates are counted as such once handled.
    let started = Instant::now();
    loop {
        let duplicates =
            system.metric("notification", "notification_events_skipped_total{reason=\"duplicate\"}").await?;
        let dead = system.read_topic("saga-events.dlq").await?;
        if duplicates >= 2.0 && dead.len() == 1 {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("redelivered events: {duplicates} duplicates counted, {} dead letters", dead.len());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(notifications(&system, &good.order_id.to_string()).await?.len(), 1, "one notification per event");
    assert_eq!(notifications(&system, &declined.order_id.to_string()).await?.len(), 1);
    assert_eq!(system.metric("notification", "notifications_sent_total{kind=\"ORDER_CONFIRMED\"}").await?, 1.0);
    assert_eq!(system.metric("notification", "notifications_sent_total{kind=\"ORDER_FAILED\"}").await?, 1.0);

    // A question without an order, or with a NUL in it, is a 400 with a problem document.
    for query in ["", "?order_id=", "?order_id=a%00b", "?order_id=x&other=1"] {
        let response =
            system.http.get(system.url("notification", &format!("/api/v1/notifications{query}"))).send().await?;
        assert_eq!(response.status(), 400, "{query}");
        let content_type = response.headers()["content-type"].to_str()?.to_owned();
        assert!(content_type.starts_with("application/problem+json"), "{query}: {content_type}");
    }
    system.stop().await
}
