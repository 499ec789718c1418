//! The HTTP endpoints: liveness, readiness, actor status, Prometheus metrics.

use crate::metrics;
use crate::status::Shared;
use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "live"}))
}

/// Ready when the broker is connected, the FHIR server answers (and takes writes: the circuit is
/// closed) and the mappings are loaded. When not, `reason` says why.
async fn ready(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let broker = shared.broker_connected.load(Ordering::SeqCst);
    let outage = shared.fhir_circuit.state();
    let fhir = shared.fhir_reachable.load(Ordering::SeqCst) && outage.is_none();
    // The service does not start without mappings, and a refused reload keeps the ones in force.
    let mappings = true;
    let mut body = json!({
        "status": if broker && fhir && mappings { "ready" } else { "not ready" },
        "broker": broker,
        "source": shared.source.get().map_or("starting", |s| s.kind()),
        "fhir": if shared.dry_run { json!("dry-run") } else { json!(fhir) },
        "mappings": mappings,
    });
    if let Ok(v) = shared.mappings_version.lock() {
        body["mappingsVersion"] = json!(*v);
    }
    // A refused reload does not make the service unready: the mappings in force keep running.
    if let Ok(r) = shared.mappings_refused.lock()
        && let Some(why) = r.as_ref()
    {
        body["mappingsRefused"] = json!(why);
    }
    let mut reasons = Vec::new();
    if !broker {
        reasons.push("the source (broker or event hub) is not connected (reconnecting)".to_string());
    }
    match &outage {
        Some(o) => {
            reasons.push(format!(
                "the FHIR server is unavailable since {} ({}): messages are held unacked and retried",
                crate::model::time::millis(o.since),
                o.reason
            ));
            body["fhirUnavailableSince"] = json!(crate::model::time::millis(o.since));
        }
        None if !fhir => reasons.push("the FHIR server does not answer GET metadata".to_string()),
        None => {}
    }
    if !reasons.is_empty() {
        body["reason"] = json!(reasons.join("; "));
    }
    if broker && fhir && mappings {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Every actor: its mailbox depth, messages handled, devices held and last flush.
async fn actors(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let m = metrics::get();
    let mut list: Vec<serde_json::Value> = shared.actors.iter().map(|a| a.value().snapshot()).collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let source = shared.source.get().map_or(json!({"kind": "starting"}), |s| s.snapshot());
    HttpResponse::Ok().json(json!({
        "actors": list,
        "source": source,
        "messages": {
            "received": m.messages_received.get(),
            "unacked": m.unacked.get().max(0),
            "deadLettered": metrics::dead_lettered_total(),
        }
    }))
}

/// `/debugger` → `/debugger/`: the page's relative URLs (and the sign-in cookie's path) need the slash.
async fn to_debugger() -> HttpResponse {
    HttpResponse::PermanentRedirect().insert_header(("location", "/debugger/")).finish()
}

async fn prometheus() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(metrics::render())
}

pub fn server(listen: &str, shared: Arc<Shared>, debugger: Option<crate::studio::Studio>) -> std::io::Result<Server> {
    let data = web::Data::new(shared);
    Ok(HttpServer::new(move || {
        let app = App::new()
            .app_data(data.clone())
            .route("/health/live", web::get().to(live))
            .route("/health/ready", web::get().to(ready))
            .route("/actors", web::get().to(actors))
            .route("/metrics", web::get().to(prometheus));
        match debugger.clone() {
            Some(studio) => app
                .route("/debugger", web::get().to(to_debugger))
                .service(web::scope("/debugger").configure(move |cfg| crate::studio::routes(cfg, studio))),
            None => app,
        }
    })
    .workers(1)
    .disable_signals()
    .bind(listen)?
    .run())
}
