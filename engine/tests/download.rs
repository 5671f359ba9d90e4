//! `download` against a local stand-in for the Hub API: the file list, resumable per-file
//! fetch, skipping files already present, and the errors a user sees.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use deepseek_engine::download::download_from;
use serde_json::json;

#[derive(Default)]
struct Hub {
    fetches: AtomicUsize,
}

async fn serve_hub(hub: Arc<Hub>) -> String {
    let app = Router::new()
        .route(
            "/api/models/{org}/{name}/revision/{rev}",
            get(|Path((org, name, rev)): Path<(String, String, String)>, headers: HeaderMap| async move {
                if name == "private" && headers.get("authorization").is_none() {
                    return Err(StatusCode::UNAUTHORIZED);
                }
                if org != "acme" || rev != "v1" {
                    return Err(StatusCode::NOT_FOUND);
                }
                Ok(axum::Json(json!({ "siblings": [
                    { "rfilename": "config.json" }, { "rfilename": "model.safetensors" },
                    { "rfilename": "README.md" }, { "rfilename": "inference/model.py" }
                ]})))
            }),
        )
        .route(
            "/{org}/{name}/resolve/{rev}/{file}",
            get(|State(hub): State<Arc<Hub>>, Path((_, _, _, file)): Path<(String, String, String, String)>| async move {
                hub.fetches.fetch_add(1, Ordering::SeqCst);
                match file.as_str() {
                    "config.json" => Ok("{\"model_type\":\"deepseek_v32\"}".to_string()),
                    "model.safetensors" => Ok("weights".repeat(1000)),
                    _ => Err(StatusCode::NOT_FOUND),
                }
            }),
        )
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_hub_model_is_fetched_once_with_only_the_files_an_engine_needs() {
    let hub = Arc::new(Hub::default());
    let url = serve_hub(hub.clone()).await;
    let dest = tempfile::tempdir().unwrap();
    download_from(&url, None, "hf://acme/model@v1", dest.path())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dest.path().join("model.safetensors"))
            .unwrap()
            .len(),
        7000
    );
    assert!(dest.path().join("config.json").exists());
    assert!(!dest.path().join("README.md").exists());
    assert!(!dest.path().join("model.safetensors.part").exists());
    assert_eq!(hub.fetches.load(Ordering::SeqCst), 2);
    // A second run (a restarted init container) fetches nothing again.
    download_from(&url, None, "hf://acme/model@v1", dest.path())
        .await
        .unwrap();
    assert_eq!(hub.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn errors_name_the_url_and_hint_at_the_fix() {
    let url = serve_hub(Arc::new(Hub::default())).await;
    let dest = tempfile::tempdir().unwrap();
    let e = download_from(&url, None, "hf://acme/private@v1", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    let e = download_from(&url, None, "hf://acme/model@nope", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") && e.contains("revision"), "{e}");
    let e = download_from(&url, None, "s3://bucket/prefix", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("pvc://"), "{e}");
    let e = download_from(&url, None, "hf://just-a-name", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("hf://ORG/NAME"), "{e}");
}
