//! The one error type of the HTTP API, rendered in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::runtime::SubmitError;
use crate::sched::AdmissionError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429/503).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "internal_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: None,
            retry_after: Some(5),
        }
    }

    /// The OpenAI-shaped body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The `type` string, also used as a metric label.
    pub fn error_type(&self) -> &'static str {
        self.kind
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::EngineDown => ApiError::unavailable("the engine is not running"),
            SubmitError::Admission(a) => match a {
                AdmissionError::QueueFull { .. } => ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: a.to_string(),
                    kind: "rate_limit_exceeded",
                    param: None,
                    code: Some("server_overloaded"),
                    retry_after: Some(1),
                },
                AdmissionError::TooLong { .. } | AdmissionError::ExceedsCache { .. } => ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(a.to_string(), Some("messages"))
                },
                AdmissionError::EmptyPrompt => ApiError::invalid(a.to_string(), Some("prompt")),
                AdmissionError::TooManyChoices { .. } => {
                    ApiError::invalid(a.to_string(), Some("n"))
                }
                AdmissionError::DuplicateId(_) => ApiError::internal(a.to_string()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}
