//! Routing of the resource-style endpoints (Responses, files, batches, models), which live
//! both under `/openai/v1/...` and under `/openai/...` (the api-version style).

use http::Method;

/// One of the resource endpoints. Ids are the raw path segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    CreateResponse,
    GetResponse(String),
    DeleteResponse(String),
    ResponseInputItems(String),
    UploadFile,
    ListFiles,
    GetFile(String),
    FileContent(String),
    DeleteFile(String),
    CreateBatch,
    ListBatches,
    GetBatch(String),
    CancelBatch(String),
    ListModels,
    GetModel(String),
}

/// The endpoint for `method` on an already normalised `path`, if it is one of these.
pub(crate) fn parse_endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    let rest = path.strip_prefix("/openai/")?;
    let rest = rest.strip_prefix("v1/").unwrap_or(rest);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segs: Vec<&str> = rest.split('/').collect();
    let id = |s: &str| s.to_string();
    let ep = match (method, segs.as_slice()) {
        (&Method::POST, ["responses"]) => Endpoint::CreateResponse,
        (&Method::GET, ["responses", r]) => Endpoint::GetResponse(id(r)),
        (&Method::DELETE, ["responses", r]) => Endpoint::DeleteResponse(id(r)),
        (&Method::GET, ["responses", r, "input_items"]) => Endpoint::ResponseInputItems(id(r)),
        (&Method::POST, ["files"]) => Endpoint::UploadFile,
        (&Method::GET, ["files"]) => Endpoint::ListFiles,
        (&Method::GET, ["files", f]) => Endpoint::GetFile(id(f)),
        (&Method::GET, ["files", f, "content"]) => Endpoint::FileContent(id(f)),
        (&Method::DELETE, ["files", f]) => Endpoint::DeleteFile(id(f)),
        (&Method::POST, ["batches"]) => Endpoint::CreateBatch,
        (&Method::GET, ["batches"]) => Endpoint::ListBatches,
        (&Method::GET, ["batches", b]) => Endpoint::GetBatch(id(b)),
        (&Method::POST, ["batches", b, "cancel"]) => Endpoint::CancelBatch(id(b)),
        (&Method::GET, ["models"]) => Endpoint::ListModels,
        (&Method::GET, ["models", m]) => Endpoint::GetModel(id(m)),
        _ => return None,
    };
    // An empty id cannot happen after normalisation, but keep it out anyway.
    match &ep {
        Endpoint::GetResponse(i)
        | Endpoint::DeleteResponse(i)
        | Endpoint::ResponseInputItems(i)
        | Endpoint::GetFile(i)
        | Endpoint::FileContent(i)
        | Endpoint::DeleteFile(i)
        | Endpoint::GetBatch(i)
        | Endpoint::CancelBatch(i)
        | Endpoint::GetModel(i)
            if i.is_empty() =>
        {
            None
        }
        _ => Some(ep),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(method: Method, path: &str) -> Option<Endpoint> {
        parse_endpoint(&method, path)
    }

    #[test]
    fn both_path_styles_route() {
        for prefix in ["/openai/v1", "/openai"] {
            let p = |s: &str| format!("{prefix}{s}");
            assert_eq!(
                ep(Method::POST, &p("/responses")),
                Some(Endpoint::CreateResponse)
            );
            assert_eq!(
                ep(Method::POST, &p("/responses/")),
                Some(Endpoint::CreateResponse)
            );
            assert_eq!(
                ep(Method::GET, &p("/responses/resp_1")),
                Some(Endpoint::GetResponse("resp_1".into()))
            );
            assert_eq!(
                ep(Method::DELETE, &p("/responses/resp_1")),
                Some(Endpoint::DeleteResponse("resp_1".into()))
            );
            assert_eq!(
                ep(Method::GET, &p("/responses/resp_1/input_items")),
                Some(Endpoint::ResponseInputItems("resp_1".into()))
            );
            assert_eq!(ep(Method::POST, &p("/files")), Some(Endpoint::UploadFile));
            assert_eq!(ep(Method::GET, &p("/files")), Some(Endpoint::ListFiles));
            assert_eq!(
                ep(Method::GET, &p("/files/file-1")),
                Some(Endpoint::GetFile("file-1".into()))
            );
            assert_eq!(
                ep(Method::GET, &p("/files/file-1/content")),
                Some(Endpoint::FileContent("file-1".into()))
            );
            assert_eq!(
                ep(Method::DELETE, &p("/files/file-1")),
                Some(Endpoint::DeleteFile("file-1".into()))
            );
            assert_eq!(
                ep(Method::POST, &p("/batches")),
                Some(Endpoint::CreateBatch)
            );
            assert_eq!(ep(Method::GET, &p("/batches")), Some(Endpoint::ListBatches));
            assert_eq!(
                ep(Method::GET, &p("/batches/batch_1")),
                Some(Endpoint::GetBatch("batch_1".into()))
            );
            assert_eq!(
                ep(Method::POST, &p("/batches/batch_1/cancel")),
                Some(Endpoint::CancelBatch("batch_1".into()))
            );
            assert_eq!(ep(Method::GET, &p("/models")), Some(Endpoint::ListModels));
            assert_eq!(
                ep(Method::GET, &p("/models/gpt-4o")),
                Some(Endpoint::GetModel("gpt-4o".into()))
            );
        }
    }

    #[test]
    fn other_methods_and_paths_are_not_endpoints() {
        for (m, path) in [
            (Method::GET, "/openai/v1/responses"),
            (Method::POST, "/openai/models"),
            (Method::PUT, "/openai/v1/files/x"),
            (Method::POST, "/openai/v1/files/x"),
            (Method::GET, "/openai/v1/batches/x/cancel"),
            (Method::DELETE, "/openai/v1/batches/x"),
            (Method::GET, "/openai/v1/responses/x/y"),
            (Method::POST, "/openai/v1/chat/completions"),
            (Method::POST, "/openai/deployments/d/responses"),
            (Method::POST, "/openai/v2/responses"),
            (Method::POST, "/responses"),
            (Method::POST, "/openai"),
        ] {
            assert_eq!(ep(m.clone(), path), None, "{m} {path}");
        }
    }
}
