//! The HTTP endpoints: liveness, readiness, actor status, Prometheus metrics.

use crate::metrics;
use crate::pipeline::Shared;
use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "live"}))
}

/// Ready when the broker is connected, the FHIR server answers and the mappings are loaded.
async fn ready(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let broker = shared.broker_connected.load(Ordering::SeqCst);
    let fhir = shared.fhir_reachable.load(Ordering::SeqCst);
    let mappings = shared.mappings_loaded.load(Ordering::SeqCst);
    let body = json!({
        "status": if broker && fhir && mappings { "ready" } else { "not ready" },
        "broker": broker,
        "fhir": if shared.dry_run { json!("dry-run") } else { json!(fhir) },
        "mappings": mappings,
    });
    if broker && fhir && mappings {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Every actor: its mailbox depth, messages handled, devices held and last flush.
async fn actors(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let mut list: Vec<serde_json::Value> = shared.actors.iter().map(|a| a.value().snapshot()).collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    HttpResponse::Ok().json(json!({
        "actors": list,
        "messages": {
            "received": shared.received.load(Ordering::SeqCst),
            "unacked": shared.unsettled(),
            "deadLettered": shared.dead_lettered.load(Ordering::SeqCst),
        }
    }))
}

async fn prometheus() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(metrics::render())
}

pub fn server(listen: &str, shared: Arc<Shared>) -> std::io::Result<Server> {
    let data = web::Data::new(shared);
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/health/live", web::get().to(live))
            .route("/health/ready", web::get().to(ready))
            .route("/actors", web::get().to(actors))
            .route("/metrics", web::get().to(prometheus))
    })
    .workers(1)
    .disable_signals()
    .bind(listen)?
    .run())
}
