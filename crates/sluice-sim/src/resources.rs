//! Files, batches and the models list of one region.
//!
//! Files are uploaded as `multipart/form-data` (`purpose` and `file`) and kept, with their
//! bytes, in the region's bounded store. Batches only record what was asked: they stay
//! `validating` (or `cancelling` once cancelled) and never run.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::{Value, json};
use sluice_base::{Clock, SystemClock};

use crate::body::SimBody;
use crate::multipart;
use crate::server::{Shared, json_object_body, json_response, lock, oai_error, unknown_id};
use crate::store::{ListQuery, list_page, new_id};

/// An uploaded file: its object and content.
#[derive(Debug)]
pub(crate) struct StoredFile {
    object: Value,
    content: Bytes,
}

/// Bookkeeping weight of a file beyond its content.
const FILE_OVERHEAD: usize = 512;
/// Models listed when the region's configuration names no deployments.
const DEFAULT_MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"];

fn bad_request(message: &str, param: Option<&str>) -> Response<SimBody> {
    oai_error(StatusCode::BAD_REQUEST, message, param, None)
}

fn now() -> u64 {
    SystemClock.unix_now().as_secs()
}

/// The list query, or the 400 answer for a bad one.
fn list_query(
    query: Option<&str>,
    default_limit: usize,
    max_limit: usize,
) -> Result<ListQuery, Box<Response<SimBody>>> {
    ListQuery::parse(query, default_limit, max_limit)
        .map_err(|(message, param)| Box::new(bad_request(&message, Some(param))))
}

/// `POST .../files` (multipart: `purpose`, `file`).
pub(crate) fn upload_file(shared: &Shared, headers: &HeaderMap, body: Bytes) -> Response<SimBody> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = match multipart::boundary(content_type)
        .and_then(|boundary| multipart::parse(&body, &boundary))
    {
        Ok(p) => p,
        Err(message) => return bad_request(&message, None),
    };
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose" && p.filename.is_none())
        .and_then(|p| std::str::from_utf8(&body[p.data.clone()]).ok())
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let Some(purpose) = purpose else {
        return bad_request("Missing required parameter: 'purpose'.", Some("purpose"));
    };
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return bad_request("Missing required parameter: 'file'.", Some("file"));
    };
    let content = body.slice(file.data.clone());
    let filename = file
        .filename
        .clone()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "file".to_string());
    let id = new_id("file-");
    let object = json!({
        "id": id,
        "object": "file",
        "bytes": content.len(),
        "created_at": now(),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": null,
    });
    let weight = content.len() + FILE_OVERHEAD;
    let stored = StoredFile {
        object: object.clone(),
        content,
    };
    lock(&shared.stores.files).insert(id, stored, weight);
    json_response(StatusCode::OK, &object)
}

/// `GET .../files` (`purpose`, `limit`, `order` (default `desc`), `after`).
pub(crate) fn list_files(shared: &Shared, query: Option<&str>) -> Response<SimBody> {
    let q = match list_query(query, 10_000, 10_000) {
        Ok(q) => q,
        Err(resp) => return *resp,
    };
    let purpose = crate::server::query_param(query, "purpose").filter(|p| !p.is_empty());
    let files: Vec<Value> = lock(&shared.stores.files)
        .iter()
        .map(|(_, f)| &f.object)
        .filter(|o| purpose.is_none_or(|p| o["purpose"] == p))
        .cloned()
        .collect();
    json_response(StatusCode::OK, &list_page(files, &q))
}

/// `GET .../files/{id}`.
pub(crate) fn get_file(shared: &Shared, id: &str) -> Response<SimBody> {
    match lock(&shared.stores.files).get(id) {
        Some(f) => json_response(StatusCode::OK, &f.object),
        None => unknown_id("File", id),
    }
}

/// `GET .../files/{id}/content`: the bytes as uploaded.
pub(crate) fn file_content(shared: &Shared, id: &str) -> Response<SimBody> {
    let Some(content) = lock(&shared.stores.files)
        .get(id)
        .map(|f| f.content.clone())
    else {
        return unknown_id("File", id);
    };
    let mut resp = Response::new(SimBody::full(content));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// `DELETE .../files/{id}`.
pub(crate) fn delete_file(shared: &Shared, id: &str) -> Response<SimBody> {
    match lock(&shared.stores.files).remove(id) {
        Some(_) => json_response(
            StatusCode::OK,
            &json!({ "id": id, "object": "file", "deleted": true }),
        ),
        None => unknown_id("File", id),
    }
}

/// `POST .../batches` (`input_file_id`, `endpoint`, `completion_window`, optional `metadata`).
pub(crate) fn create_batch(shared: &Shared, bytes: &[u8]) -> Response<SimBody> {
    let body = match json_object_body(bytes) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let mut fields = Vec::new();
    for key in ["input_file_id", "endpoint", "completion_window"] {
        match body.get(key) {
            Some(Value::String(s)) if !s.is_empty() => fields.push(s.clone()),
            None | Some(Value::Null) => {
                return oai_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Missing required parameter: '{key}'."),
                    Some(key),
                    Some("missing_required_parameter"),
                );
            }
            Some(_) => {
                return bad_request(
                    &format!("Invalid value for '{key}': expected a non-empty string."),
                    Some(key),
                );
            }
        }
    }
    let [input_file_id, endpoint, completion_window] = <[String; 3]>::try_from(fields)
        .unwrap_or_else(|_| unreachable!("three fields were checked"));
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => Value::Null,
        Some(m @ Value::Object(_)) => m.clone(),
        Some(_) => {
            return bad_request(
                "Invalid type for 'metadata': expected an object.",
                Some("metadata"),
            );
        }
    };
    if lock(&shared.stores.files).get(&input_file_id).is_none() {
        return oai_error(
            StatusCode::NOT_FOUND,
            &format!("File with id '{input_file_id}' not found."),
            Some("input_file_id"),
            None,
        );
    }
    let created_at = now();
    let id = new_id("batch_");
    let batch = json!({
        "id": id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": null,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "output_file_id": null,
        "error_file_id": null,
        "created_at": created_at,
        "in_progress_at": null,
        "expires_at": created_at + 24 * 60 * 60,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": { "total": 0, "completed": 0, "failed": 0 },
        "metadata": metadata,
    });
    let weight = batch.to_string().len();
    lock(&shared.stores.batches).insert(id, batch.clone(), weight);
    json_response(StatusCode::OK, &batch)
}

/// `GET .../batches` (`limit` (default 20), `after`; newest first).
pub(crate) fn list_batches(shared: &Shared, query: Option<&str>) -> Response<SimBody> {
    let q = match list_query(query, 20, 100) {
        Ok(q) => q,
        Err(resp) => return *resp,
    };
    let batches: Vec<Value> = lock(&shared.stores.batches)
        .iter()
        .map(|(_, b)| b.clone())
        .collect();
    json_response(StatusCode::OK, &list_page(batches, &q))
}

/// `GET .../batches/{id}`.
pub(crate) fn get_batch(shared: &Shared, id: &str) -> Response<SimBody> {
    match lock(&shared.stores.batches).get(id) {
        Some(b) => json_response(StatusCode::OK, b),
        None => unknown_id("Batch", id),
    }
}

/// `POST .../batches/{id}/cancel`: the batch moves to `cancelling` (and stays there).
pub(crate) fn cancel_batch(shared: &Shared, id: &str) -> Response<SimBody> {
    let mut batches = lock(&shared.stores.batches);
    let Some(batch) = batches.get_mut(id) else {
        return unknown_id("Batch", id);
    };
    if batch["status"] != "cancelling" {
        batch["status"] = json!("cancelling");
        batch["cancelling_at"] = json!(now());
    }
    json_response(StatusCode::OK, batch)
}

/// The model names this region lists: its configured deployments, else a fixed few.
fn model_names(shared: &Shared) -> Vec<String> {
    let mut names: Vec<String> = shared.cfg.deployments.keys().cloned().collect();
    if names.is_empty() {
        names = DEFAULT_MODELS.iter().map(|s| (*s).to_string()).collect();
    }
    names.sort();
    names
}

fn model_object(shared: &Shared, name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": shared.started_at, "owned_by": "system" })
}

/// `GET /openai[/v1]/models`.
pub(crate) fn list_models(shared: &Arc<Shared>) -> Response<SimBody> {
    let data: Vec<Value> = model_names(shared)
        .iter()
        .map(|m| model_object(shared, m))
        .collect();
    json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

/// `GET /openai[/v1]/models/{id}`.
pub(crate) fn get_model(shared: &Arc<Shared>, id: &str) -> Response<SimBody> {
    if model_names(shared).iter().any(|m| m == id) {
        json_response(StatusCode::OK, &model_object(shared, id))
    } else {
        oai_error(
            StatusCode::NOT_FOUND,
            &format!("The model '{id}' does not exist."),
            Some("model"),
            Some("model_not_found"),
        )
    }
}
