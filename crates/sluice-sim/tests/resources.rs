//! Files, batches and models over real HTTP: per-region objects, 404s, auth and counting.

mod common;

use common::*;
use http::StatusCode;
use serde_json::{Value, json};
use sluice_sim::{DeploymentConfig, RegionConfig};

fn assert_id(id: &Value, prefix: &str) -> String {
    let id = id.as_str().unwrap_or_else(|| panic!("id {id}"));
    let hex = id
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{id} lacks {prefix}"));
    assert_eq!(hex.len(), 32, "{id}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    id.to_string()
}

async fn upload(addr: std::net::SocketAddr, path: &str, purpose: &str, content: &[u8]) -> Value {
    let (content_type, body) = multipart_upload(purpose, "requests.jsonl", content);
    let r = send(addr, Call::post_raw(path, &content_type, body)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.json()
}

fn not_found(kind: &str, id: &str) -> Value {
    json!({ "error": {
        "message": format!("{kind} with id '{id}' not found."),
        "type": "invalid_request_error",
        "param": null,
        "code": null,
    } })
}

#[tokio::test]
async fn files_upload_read_list_and_delete() {
    let sim = start(RegionConfig::new("eastus")).await;
    // Bytes that look like multipart framing must survive untouched.
    let content = b"{\"custom_id\":\"1\"}\r\n--not-a-boundary\r\n\x00\xff binary tail\r\n".to_vec();
    let file = upload(sim.addr(), "/openai/v1/files", "batch", &content).await;
    let id = assert_id(&file["id"], "file-");
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], content.len());
    assert!(file["created_at"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(file["filename"], "requests.jsonl");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");

    // Both path styles see the same file.
    for path in [
        format!("/openai/v1/files/{id}"),
        format!("/openai/files/{id}?api-version=2024-10-21"),
    ] {
        let r = send(sim.addr(), Call::get(&path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        r.assert_azure_headers("East US");
        assert_eq!(r.json(), file);
    }
    let r = send(
        sim.addr(),
        Call::get(&format!("/openai/files/{id}/content")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.body.as_ref(), content.as_slice());

    let other = upload(
        sim.addr(),
        "/openai/files?api-version=2024-10-21",
        "assistants",
        b"x",
    )
    .await;
    let r = send(sim.addr(), Call::get("/openai/v1/files")).await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    assert_eq!(list["object"], "list");
    // Newest first.
    assert_eq!(list["data"], json!([other, file]));
    let r = send(sim.addr(), Call::get("/openai/v1/files?purpose=batch")).await;
    assert_eq!(r.json()["data"], json!([file]));

    let r = send(sim.addr(), Call::delete(&format!("/openai/v1/files/{id}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!({ "id": id, "object": "file", "deleted": true })
    );
    for call in [
        Call::get(&format!("/openai/v1/files/{id}")),
        Call::get(&format!("/openai/v1/files/{id}/content")),
        Call::delete(&format!("/openai/v1/files/{id}")),
    ] {
        let r = send(sim.addr(), call).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json(), not_found("File", &id));
    }
    let r = send(sim.addr(), Call::get("/openai/v1/files")).await;
    assert_eq!(r.json()["data"], json!([other]));
}

#[tokio::test]
async fn file_uploads_need_a_multipart_purpose_and_file() {
    let sim = start(RegionConfig::new("eastus")).await;
    let r = send(
        sim.addr(),
        Call::post("/openai/v1/files", json!({ "purpose": "batch" })),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    let boundary = "b0undary";
    let ct = format!("multipart/form-data; boundary={boundary}");
    let only_file = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nabc\r\n--{boundary}--\r\n"
    );
    let r = send(
        sim.addr(),
        Call::post_raw("/openai/v1/files", &ct, only_file),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "purpose");

    let only_purpose = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}--\r\n"
    );
    let r = send(
        sim.addr(),
        Call::post_raw("/openai/v1/files", &ct, only_purpose),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "file");

    let unterminated =
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch");
    let r = send(
        sim.addr(),
        Call::post_raw("/openai/v1/files", &ct, unterminated),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = send(sim.addr(), Call::get("/openai/v1/files")).await;
    assert_eq!(r.json()["data"], json!([]));
}

#[tokio::test]
async fn batches_create_get_list_cancel_and_404() {
    let sim = start(RegionConfig::new("eastus")).await;
    let file = upload(sim.addr(), "/openai/v1/files", "batch", b"{}\n").await;
    let file_id = file["id"].as_str().unwrap();
    let body = json!({
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    });
    let r = send(sim.addr(), Call::post("/openai/v1/batches", body.clone())).await;
    assert_eq!(r.status, StatusCode::OK);
    r.assert_azure_headers("East US");
    let batch = r.json();
    let id = assert_id(&batch["id"], "batch_");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["input_file_id"], file_id);
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(batch["status"], "validating");
    let created = batch["created_at"].as_u64().unwrap();
    assert!(created > 1_600_000_000);
    assert_eq!(batch["expires_at"], created + 86_400);
    assert_eq!(
        batch["request_counts"],
        json!({ "total": 0, "completed": 0, "failed": 0 })
    );

    let r = send(
        sim.addr(),
        Call::get(&format!("/openai/batches/{id}?api-version=2024-10-21")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), batch);

    let second = send(sim.addr(), Call::post("/openai/batches", body))
        .await
        .json();
    let r = send(sim.addr(), Call::get("/openai/v1/batches")).await;
    let list = r.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"], json!([second, batch]));
    assert_eq!(list["has_more"], false);
    let r = send(sim.addr(), Call::get("/openai/v1/batches?limit=1")).await;
    let page = r.json();
    assert_eq!(page["data"], json!([second]));
    assert_eq!(page["has_more"], true);

    let r = send(
        sim.addr(),
        Call::post(&format!("/openai/v1/batches/{id}/cancel"), json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let cancelled = r.json();
    assert_eq!(cancelled["status"], "cancelling");
    assert!(cancelled["cancelling_at"].as_u64().unwrap() >= created);
    let r = send(sim.addr(), Call::get(&format!("/openai/v1/batches/{id}"))).await;
    assert_eq!(r.json(), cancelled);

    let missing = "batch_ffffffffffffffffffffffffffffffff";
    for call in [
        Call::get(&format!("/openai/v1/batches/{missing}")),
        Call::post(&format!("/openai/v1/batches/{missing}/cancel"), json!({})),
    ] {
        let r = send(sim.addr(), call).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json(), not_found("Batch", missing));
    }

    // The input file must exist here.
    let r = send(
        sim.addr(),
        Call::post(
            "/openai/v1/batches",
            json!({ "input_file_id": "file-nope", "endpoint": "/v1/embeddings",
                    "completion_window": "24h" }),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let v = r.json();
    assert_eq!(v["error"]["message"], "File with id 'file-nope' not found.");
    assert_eq!(v["error"]["param"], "input_file_id");

    for bad in [
        json!({ "endpoint": "/v1/embeddings", "completion_window": "24h" }),
        json!({ "input_file_id": file_id, "completion_window": "24h" }),
        json!({ "input_file_id": file_id, "endpoint": "/v1/embeddings" }),
        json!({ "input_file_id": 7, "endpoint": "/v1/embeddings", "completion_window": "24h" }),
    ] {
        let r = send(sim.addr(), Call::post("/openai/v1/batches", bad.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn regions_keep_their_own_objects() {
    let east = start(RegionConfig::new("eastus")).await;
    let west = start(RegionConfig::new("westus")).await;
    let file = upload(east.addr(), "/openai/v1/files", "batch", b"{}\n").await;
    let id = file["id"].as_str().unwrap();
    let r = send(west.addr(), Call::get(&format!("/openai/v1/files/{id}"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    r.assert_azure_headers("West US");
    let r = send(west.addr(), Call::get("/openai/v1/files")).await;
    assert_eq!(r.json()["data"], json!([]));
    let r = send(
        west.addr(),
        Call::post(
            "/openai/v1/batches",
            json!({ "input_file_id": id, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h" }),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn models_list_on_both_paths() {
    let sim = start(RegionConfig::new("eastus")).await;
    for path in ["/openai/v1/models", "/openai/models?api-version=2024-10-21"] {
        let r = send(sim.addr(), Call::get(path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        r.assert_azure_headers("East US");
        let v = r.json();
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]);
        for m in data {
            assert_eq!(m["object"], "model");
            assert_eq!(m["owned_by"], "system");
            assert!(m["created"].as_u64().unwrap() > 1_600_000_000);
        }
    }
    let r = send(sim.addr(), Call::get("/openai/v1/models/gpt-4o-mini")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], "gpt-4o-mini");
    let r = send(sim.addr(), Call::get("/openai/v1/models/davinci")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // A region with configured deployments lists those.
    let mut cfg = RegionConfig::new("westus");
    for name in ["chat-prod", "embed"] {
        cfg.deployments
            .insert(name.into(), DeploymentConfig::default());
    }
    let sim = start(cfg).await;
    let v = send(sim.addr(), Call::get("/openai/v1/models"))
        .await
        .json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat-prod", "embed"]);
}

#[tokio::test]
async fn new_routes_need_the_key_count_and_take_faults() {
    let mut cfg = RegionConfig::new("eastus");
    cfg.api_key = Some("backend-secret".into());
    let sim = start(cfg).await;
    let (ct, body) = multipart_upload("batch", "a.jsonl", b"{}");
    let calls = || {
        vec![
            Call::post(
                "/openai/v1/responses",
                json!({ "model": "gpt-4o", "input": "hi" }),
            ),
            Call::get("/openai/v1/responses/resp_x"),
            Call::delete("/openai/responses/resp_x"),
            Call::get("/openai/v1/responses/resp_x/input_items"),
            Call::post_raw("/openai/v1/files", &ct, body.clone()),
            Call::get("/openai/files"),
            Call::get("/openai/v1/files/file-x"),
            Call::get("/openai/v1/files/file-x/content"),
            Call::delete("/openai/v1/files/file-x"),
            Call::post(
                "/openai/v1/batches",
                json!({ "input_file_id": "f", "endpoint": "/v1/embeddings",
                        "completion_window": "24h" }),
            ),
            Call::get("/openai/v1/batches"),
            Call::get("/openai/batches/batch_x"),
            Call::post("/openai/v1/batches/batch_x/cancel", json!({})),
            Call::get("/openai/v1/models"),
            Call::get("/openai/models/gpt-4o"),
        ]
    };
    let n = calls().len() as u64;
    for call in calls() {
        let path = call.path;
        let r = send(sim.addr(), call.header("api-key", "wrong")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(r.json()["error"]["code"], "401", "{path}");
    }
    assert_eq!(sim.requests_seen(), n);
    for call in calls() {
        let path = call.path;
        let r = send(
            sim.addr(),
            call.header("authorization", "Bearer backend-secret"),
        )
        .await;
        assert!(
            r.status != StatusCode::UNAUTHORIZED && r.status.as_u16() < 500,
            "{path}: {r:?}"
        );
    }
    assert_eq!(sim.requests_seen(), 2 * n);

    let r = send(
        sim.addr(),
        Call::get("/openai/v1/models")
            .header("api-key", "backend-secret")
            .header("x-sim-fault", "status=503"),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.requests_seen(), 2 * n + 1);
}
