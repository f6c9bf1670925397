//! The HTTP front (`--http-listen`): the scoring endpoints of vLLM's OpenAI
//! server, SGLang and TRL's `vllm-serve`, answered by the same
//! [`LoadedService`] (queue, batching, engine) as gRPC, under the same bearer
//! token, TLS, size limit, deadline, call slots, drain and metrics.
//!
//! | endpoint | as | module |
//! | --- | --- | --- |
//! | `GET /health`, `/health/` | vLLM, SGLang, TRL | here |
//! | `GET /v1/models` | vLLM | [`vllm`] |
//! | `POST /v1/completions` | vLLM (`prompt_logprobs`) | [`vllm`] |
//! | `POST /generate` | SGLang (`return_logprob`, `max_new_tokens: 0`) | [`sglang`] |
//! | `POST /get_sequence_logprobs/` | TRL 1.1's `vllm-serve` | [`trl`] |
//!
//! Token positions are shifted to the callers' convention in one place,
//! [`score`]. Request bodies are parsed by hand ([`json`]) so that each
//! wrong field is named as the real server names it, and unknown fields
//! are ignored.

pub mod json;
pub mod score;
pub mod sglang;
pub mod trl;
pub mod vllm;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokenizers::Tokenizer;
use tonic::Code;

use crate::{
    auth::BearerAuth,
    error::{AuthError, ServiceError},
    metrics as m,
    service::{LoadedService, TeacherService},
};

/// Which server's conventions an endpoint follows (its error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// vLLM's OpenAI server: `{"error": {"message", "type", "param", "code"}}`.
    Vllm,
    /// SGLang: `{"error": {"message"}}`.
    Sglang,
    /// TRL's `vllm-serve` (FastAPI): `{"detail": ...}`.
    Trl,
}

/// A failed HTTP call: its status, the gRPC code and error type it is
/// counted under in the metrics, and logitd's message.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The gRPC code of the same failure (the metrics' `status` label).
    pub code: Code,
    /// The metrics' `error_type` label.
    pub error_type: &'static str,
    /// What went wrong, naming the value.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// For FastAPI's 422 bodies: the pydantic error type (`missing`,
    /// `int_type`, `json_invalid`, ...), set when the body does not fit the
    /// schema.
    pub schema: Option<&'static str>,
}

impl HttpError {
    /// 400: the request is wrong (INVALID_ARGUMENT, `validation`).
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: Code::InvalidArgument,
            error_type: "validation",
            message: message.into(),
            param: param.map(str::to_string),
            schema: None,
        }
    }

    /// 400 (422 for TRL's FastAPI server): the body does not fit the schema.
    pub fn schema(kind: &'static str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self { schema: Some(kind), ..Self::bad_request(message, param) }
    }

    fn status(status: StatusCode, code: Code, error_type: &'static str, message: String) -> Self {
        Self { status, code, error_type, message, param: None, schema: None }
    }

    /// The body as `api`'s server would write it.
    fn render(&self, api: Api) -> Response {
        let (status, body) = match api {
            _ if self.status == StatusCode::UNAUTHORIZED => {
                // vLLM's and SGLang's API-key middleware: {"error": "Unauthorized"}.
                let body =
                    serde_json::json!({ "error": format!("Unauthorized: {}", self.message) });
                (self.status, body)
            }
            Api::Vllm => {
                let kind = match self.status {
                    StatusCode::BAD_REQUEST if self.schema.is_some() => "Bad Request",
                    StatusCode::BAD_REQUEST => "BadRequestError",
                    StatusCode::NOT_FOUND => "NotFoundError",
                    StatusCode::INTERNAL_SERVER_ERROR => "InternalServerError",
                    StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
                    s => s.canonical_reason().unwrap_or("Error"),
                };
                let body = serde_json::json!({ "error": {
                    "message": self.message, "type": kind, "param": self.param,
                    "code": self.status.as_u16(),
                }});
                (self.status, body)
            }
            Api::Sglang => {
                (self.status, serde_json::json!({ "error": { "message": self.message } }))
            }
            Api::Trl => match self.schema {
                // FastAPI's request validation: 422 with pydantic's error list.
                Some(kind) => {
                    let mut loc = vec![serde_json::Value::from("body")];
                    loc.extend(self.param.iter().map(|p| serde_json::Value::from(p.as_str())));
                    let body = serde_json::json!({ "detail": [{
                        "type": kind, "loc": loc, "msg": self.message,
                    }]});
                    (StatusCode::UNPROCESSABLE_ENTITY, body)
                }
                None => (self.status, serde_json::json!({ "detail": self.message })),
            },
        };
        let mut response = (status, json_body(body.to_string().into_bytes())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<ServiceError> for HttpError {
    fn from(e: ServiceError) -> Self {
        let code = e.code();
        let status = match code {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            // Overload and a closed queue: 503, which the HTTP clients retry
            // (TRL's session retries 500/502/503, openai 429 and 5xx).
            Code::ResourceExhausted | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::status(status, code, e.error_type(), e.to_string())
    }
}

fn json_body(bytes: Vec<u8>) -> ([(header::HeaderName, HeaderValue); 1], Body) {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], Body::from(bytes))
}

/// A JSON reply.
pub fn json_response(bytes: Vec<u8>) -> Response {
    (StatusCode::OK, json_body(bytes)).into_response()
}

/// What a handler gets: the loaded service and the teacher's tokenizer.
#[derive(Clone)]
pub struct Ctx {
    /// The service (validation, queue, engine).
    pub service: Arc<LoadedService>,
    /// The teacher's tokenizer, when the server could load it.
    pub tokenizer: Option<Arc<Tokenizer>>,
}

/// The state of the HTTP front.
pub struct HttpFront {
    teacher: TeacherService,
    auth: BearerAuth,
    tokenizer: OnceLock<Option<Arc<Tokenizer>>>,
    serving: AtomicBool,
    max_body: usize,
}

impl HttpFront {
    /// A front sharing `teacher`'s service and call slots, checking `auth`,
    /// refusing bodies over `max_body` bytes.
    pub fn new(teacher: TeacherService, auth: BearerAuth, max_body: usize) -> Arc<Self> {
        Arc::new(Self {
            teacher,
            auth,
            tokenizer: OnceLock::new(),
            serving: AtomicBool::new(false),
            max_body,
        })
    }

    /// Health turns 200 (`true`) or 503.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }

    /// The teacher's tokenizer (or none) for text prompts and decoded tokens.
    pub fn set_tokenizer(&self, tokenizer: Option<Tokenizer>) {
        let _ = self.tokenizer.set(tokenizer.map(Arc::new));
    }

    /// Runs one call: the bearer token, the body (bounded), readiness and a
    /// call slot, then `handler`; counts it in the metrics under `method`.
    async fn call<F, Fut>(
        self: Arc<Self>,
        api: Api,
        method: &'static str,
        headers: HeaderMap,
        body: Body,
        handler: F,
    ) -> Response
    where
        F: FnOnce(Ctx, Bytes) -> Fut,
        Fut: Future<Output = Result<Response, HttpError>>,
    {
        let started = Instant::now();
        let result = async {
            self.check_auth(&headers)?;
            let body = axum::body::to_bytes(body, self.max_body).await.map_err(|e| {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.to_string().contains("length limit exceeded"))
                    || e.to_string().contains("length limit exceeded");
                if too_large {
                    HttpError::status(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        Code::OutOfRange,
                        "validation",
                        format!(
                            "the request body is larger than --max-message-bytes ({} bytes)",
                            self.max_body
                        ),
                    )
                } else {
                    HttpError::bad_request(format!("reading the request body: {e}"), None)
                }
            })?;
            let service = self.teacher.ready().map_err(HttpError::from)?;
            let _slot = self.teacher.slot().map_err(HttpError::from)?;
            let tokenizer = self.tokenizer.get().cloned().flatten();
            handler(Ctx { service, tokenizer }, body).await
        }
        .await;
        record(method, started, &result);
        match result {
            Ok(r) => r,
            Err(e) => e.render(api),
        }
    }

    fn check_auth(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        let value = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        self.auth.check(value).map_err(|e: AuthError| HttpError::from(ServiceError::from(e)))
    }

    /// 200 once the model is loaded and until the drain, else 503.
    fn health(&self) -> StatusCode {
        if self.serving.load(Ordering::SeqCst) && self.teacher.ready().is_ok() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// Counts a call as the gRPC calls are counted (`logitd_requests_total`,
/// `logitd_errors_total`, `logitd_request_duration_seconds`), with the
/// endpoint as the method (`POST /v1/completions`) and the gRPC code of the
/// outcome as the status.
fn record(method: &'static str, started: Instant, result: &Result<Response, HttpError>) {
    let status = result.as_ref().map_or_else(|e| e.code, |_| Code::Ok);
    let status = logitd_proto::code_name(status);
    metrics::counter!(m::REQUESTS, "method" => method, "status" => status).increment(1);
    if let Err(e) = result {
        metrics::counter!(m::ERRORS, "method" => method, "status" => status, "error_type" => e.error_type)
            .increment(1);
    }
    metrics::histogram!(m::REQUEST_DURATION, "method" => method)
        .record(started.elapsed().as_secs_f64());
}

macro_rules! endpoint {
    ($name:ident, $api:expr, $method:literal, $handler:path) => {
        async fn $name(
            State(front): State<Arc<HttpFront>>,
            headers: HeaderMap,
            body: Body,
        ) -> Response {
            front.call($api, $method, headers, body, $handler).await
        }
    };
}

endpoint!(completions, Api::Vllm, "POST /v1/completions", vllm::completions);
endpoint!(models, Api::Vllm, "GET /v1/models", vllm::models);
endpoint!(generate, Api::Sglang, "POST /generate", sglang::generate);
endpoint!(sequence_logprobs, Api::Trl, "POST /get_sequence_logprobs/", trl::get_sequence_logprobs);

/// vLLM's and SGLang's `GET /health`: 200 with an empty body, or 503.
async fn health(State(front): State<Arc<HttpFront>>) -> Response {
    front.health().into_response()
}

/// TRL's `vllm-serve` `GET /health/`: `{"status": "ok"}`, or 503.
async fn health_trl(State(front): State<Arc<HttpFront>>) -> Response {
    match front.health() {
        StatusCode::OK => json_response(br#"{"status":"ok"}"#.to_vec()),
        s => s.into_response(),
    }
}

/// FastAPI's 404: `{"detail": "Not Found"}`.
async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, json_body(br#"{"detail":"Not Found"}"#.to_vec())).into_response()
}

/// The routes.
pub fn router(front: Arc<HttpFront>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/", get(health_trl))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/generate", post(generate).put(generate))
        .route("/get_sequence_logprobs/", post(sequence_logprobs))
        .route("/get_sequence_logprobs", post(sequence_logprobs))
        .fallback(not_found)
        .with_state(front)
}

/// TLS for the HTTP port: the same certificate, key and client CA as gRPC.
pub struct Tls {
    /// PEM certificate chain.
    pub cert: Vec<u8>,
    /// PEM private key.
    pub key: Vec<u8>,
    /// PEM CA that client certificates must chain to (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
}

/// Serves `front` on `listener` (TLS when `tls`) until `shutdown`, then
/// finishes the calls in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    front: Arc<HttpFront>,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let app = router(front);
    match tls {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| e.to_string()),
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, &tls)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

mod tls {
    use std::sync::Arc;

    use tokio::{net::TcpListener, sync::mpsc};
    use tokio_rustls::{
        TlsAcceptor,
        rustls::{
            RootCertStore, ServerConfig,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
            server::WebPkiClientVerifier,
        },
        server::TlsStream,
    };

    use super::{SocketAddr, Tls};

    /// Accepts TCP connections and hands on those whose TLS handshake
    /// completes (each handshake on its own task, bounded in time, so a slow
    /// or silent client holds up no other).
    pub struct TlsListener {
        local: SocketAddr,
        ready: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
        _accept: tokio::task::JoinHandle<()>,
    }

    impl TlsListener {
        pub fn new(listener: TcpListener, tls: &Tls) -> Result<Self, String> {
            let config = config(tls)?;
            let acceptor = TlsAcceptor::from(Arc::new(config));
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            let (tx, ready) = mpsc::channel(64);
            let accept = tokio::spawn(async move {
                loop {
                    let Ok((tcp, peer)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        let handshake = acceptor.accept(tcp);
                        let timeout = std::time::Duration::from_secs(10);
                        match tokio::time::timeout(timeout, handshake).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send((stream, peer)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "HTTP TLS handshake failed"),
                            Err(_) => tracing::debug!("HTTP TLS handshake timed out"),
                        }
                    });
                }
            });
            Ok(Self { local, ready, _accept: accept })
        }
    }

    impl Drop for TlsListener {
        fn drop(&mut self) {
            self._accept.abort();
        }
    }

    impl axum::serve::Listener for TlsListener {
        type Io = TlsStream<tokio::net::TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            match self.ready.recv().await {
                Some(c) => c,
                // The accept task never ends while the listener lives.
                None => std::future::pending().await,
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            Ok(self.local)
        }
    }

    fn config(tls: &Tls) -> Result<ServerConfig, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--tls-cert: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&tls.key).map_err(|e| format!("--tls-key: {e}"))?;
        let builder = ServerConfig::builder();
        let builder = match &tls.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| format!("--tls-client-ca: {e}"))?;
                    roots.add(cert).map_err(|e| format!("--tls-client-ca: {e}"))?;
                }
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| format!("--tls-client-ca: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}
