//! Routing of the resource-style endpoints (Responses, files, batches, models), which live
//! both under `/openai/v1/...` and under `/openai/...` (the api-version style), and of the
//! audio, image and realtime endpoints, which live under `/openai/v1/...` (the deployment
//! named by `model`) and under `/openai/deployments/{name}/...` (realtime: `/openai/realtime`
//! with a `deployment` query parameter).

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
    /// `audio/transcriptions`; the deployment from the path, `None` on v1.
    Transcription(Option<String>),
    /// `audio/translations`.
    Translation(Option<String>),
    /// `audio/speech`.
    Speech(Option<String>),
    /// `images/generations`.
    ImageGeneration(Option<String>),
    /// `images/edits`.
    ImageEdit(Option<String>),
    /// `GET /openai/v1/realtime` (`ga: true`, GA event names) or `GET /openai/realtime`
    /// (`ga: false`, the preview's event names).
    Realtime {
        ga: bool,
    },
}

/// The audio, image or realtime endpoint for `method` on a normalised `path`.
fn media_endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    let rest = path.strip_prefix("/openai/")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segs: Vec<&str> = rest.split('/').collect();
    let (deployment, tail) = match segs.as_slice() {
        ["v1", "realtime"] if method == Method::GET => {
            return Some(Endpoint::Realtime { ga: true });
        }
        ["realtime"] if method == Method::GET => return Some(Endpoint::Realtime { ga: false }),
        ["v1", tail @ ..] => (None, tail),
        ["deployments", d, tail @ ..] if !d.is_empty() => (Some((*d).to_string()), tail),
        _ => return None,
    };
    if method != Method::POST {
        return None;
    }
    Some(match tail {
        ["audio", "transcriptions"] => Endpoint::Transcription(deployment),
        ["audio", "translations"] => Endpoint::Translation(deployment),
        ["audio", "speech"] => Endpoint::Speech(deployment),
        ["images", "generations"] => Endpoint::ImageGeneration(deployment),
        ["images", "edits"] => Endpoint::ImageEdit(deployment),
        _ => return None,
    })
}

/// The endpoint for `method` on an already normalised `path`, if it is one of these.
pub(crate) fn parse_endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    if let Some(ep) = media_endpoint(method, path) {
        return Some(ep);
    }
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
            (Method::POST, "/openai/audio/transcriptions"),
            (Method::GET, "/openai/v1/audio/transcriptions"),
            (Method::POST, "/openai/deployments/d/audio/voices"),
            (Method::POST, "/openai/deployments/d/images/variations"),
            (Method::POST, "/openai/v1/realtime"),
            (Method::GET, "/openai/deployments/d/realtime"),
            (Method::GET, "/openai/v1/realtime/x"),
            (Method::POST, "/responses"),
            (Method::POST, "/openai"),
        ] {
            assert_eq!(ep(m.clone(), path), None, "{m} {path}");
        }
    }

    #[test]
    fn media_and_realtime_routes() {
        let d = || Some("dep".to_string());
        for (path, deployment) in [("/openai/v1", None), ("/openai/deployments/dep", d())] {
            let p = |s: &str| format!("{path}{s}");
            assert_eq!(
                ep(Method::POST, &p("/audio/transcriptions")),
                Some(Endpoint::Transcription(deployment.clone()))
            );
            assert_eq!(
                ep(Method::POST, &p("/audio/translations/")),
                Some(Endpoint::Translation(deployment.clone()))
            );
            assert_eq!(
                ep(Method::POST, &p("/audio/speech")),
                Some(Endpoint::Speech(deployment.clone()))
            );
            assert_eq!(
                ep(Method::POST, &p("/images/generations")),
                Some(Endpoint::ImageGeneration(deployment.clone()))
            );
            assert_eq!(
                ep(Method::POST, &p("/images/edits")),
                Some(Endpoint::ImageEdit(deployment.clone()))
            );
        }
        assert_eq!(
            ep(Method::GET, "/openai/v1/realtime"),
            Some(Endpoint::Realtime { ga: true })
        );
        assert_eq!(
            ep(Method::GET, "/openai/realtime/"),
            Some(Endpoint::Realtime { ga: false })
        );
    }
}
