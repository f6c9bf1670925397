//! `logitd serve`: loads the teacher, warms it up, serves gRPC (Teacher,
//! health, reflection) and `/metrics`, and drains on SIGTERM/Ctrl-C.

use std::time::Duration;

use candle_core::DType;
use logitd_proto::v1::{ModelInfo, teacher_server::TeacherServer};
use tokio::net::TcpListener;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    auth::BearerAuth,
    cli::{DtypeArg, ModelArgs, ServeArgs},
    device,
    engine::{Engine, SchedulerHandle, WorkerThreads},
    http, metrics as m,
    model::{ModelError, Teacher, demo_teacher, load_tokenizer, resolve_model, tokenizer_sha256},
    service::{Limits, LoadedService, TeacherService},
};

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The sampler backend could not be set up, or the warm-up batch failed.
    #[error(transparent)]
    Engine(#[from] crate::scoring::EngineError),
    /// A listener could not be bound or a TLS file read.
    #[error("{0}")]
    Io(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A task of the server panicked or was cancelled.
    #[error("{task} task failed: {source}")]
    Task {
        /// Which task.
        task: &'static str,
        /// Its panic or cancellation.
        source: tokio::task::JoinError,
    },
}

/// A loaded model with everything ModelInfo reports.
pub struct Loaded {
    /// The teacher.
    pub teacher: Teacher,
    /// What GetModelInfo answers.
    pub info: ModelInfo,
}

/// Resolves `--model` (or the cached demo teacher), device and dtype, loads the
/// teacher and describes it.
pub fn load_model(args: &ModelArgs) -> Result<Loaded, ServeError> {
    let path = resolve_model(args.model.as_deref())?;
    let device = device::parse(&args.device).map_err(|e| ServeError::Config(e.to_string()))?;
    let teacher = match args.dtype {
        // What the file stores: a GGUF file's quantized matrices, and on the
        // CPU bf16/f16 matrices, stay as stored (f32 activations); on a GPU a
        // Hugging Face directory computes in its stored bf16 or f16.
        DtypeArg::Auto => Teacher::load_kept(&path, &device)?,
        DtypeArg::F32 => Teacher::load(&path, &device, DType::F32)?,
        DtypeArg::Bf16 => Teacher::load(&path, &device, DType::BF16)?,
        DtypeArg::F16 => Teacher::load(&path, &device, DType::F16)?,
    };
    let c = teacher.config();
    let max_len = match args.max_sequence_length {
        Some(n) if n > args.max_batch_tokens => {
            return Err(ServeError::Config(format!(
                "--max-sequence-length {n} is more than --max-batch-tokens {}: a sequence must fit one batch",
                args.max_batch_tokens
            )));
        }
        Some(n) => n,
        None => (c.max_position_embeddings as u32).min(args.max_batch_tokens),
    };
    if args.default_num_samples == 0 || args.default_num_samples > args.max_num_samples {
        return Err(ServeError::Config(format!(
            "--default-num-samples {} must be between 1 and --max-num-samples {}",
            args.default_num_samples, args.max_num_samples
        )));
    }
    // A name plus a short digest of the weights, as ModelInfo promises.
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let name = name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name);
        format!("{name}@{}", &teacher.weights_sha256()[..12])
    });
    let info = ModelInfo {
        model_id,
        architecture: c.arch.name().to_string(),
        vocab_size: c.vocab_size as u32,
        max_sequence_length: max_len,
        dtype: teacher.served_dtype(),
        device: args.device.clone(),
        tokenizer_sha256: tokenizer_sha256(&path)?.unwrap_or_default(),
        default_num_samples: args.default_num_samples,
        max_num_samples: args.max_num_samples,
        max_candidates: args.max_candidates,
    };
    Ok(Loaded { teacher, info })
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Io(format!("{}: {e}", path.display())))
}

/// Where a started server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The gRPC address.
    pub grpc: std::net::SocketAddr,
    /// The `/metrics` address.
    pub metrics: std::net::SocketAddr,
    /// The HTTP front's address (`--http-listen`), if it is on.
    pub http: Option<std::net::SocketAddr>,
}

/// Runs the server until SIGTERM/Ctrl-C, then drains and returns.
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    serve_until(args, |_| {}, shutdown_signal()).await
}

/// Runs the server until `shutdown` resolves, then drains and returns;
/// `on_bound` learns the addresses as soon as the ports are bound (before the
/// model loads). For embedding the server, e.g. in tests.
pub async fn serve_until(
    args: ServeArgs,
    on_bound: impl FnOnce(Bound),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let handle = m::install().map_err(|e| ServeError::Io(format!("metrics recorder: {e}")))?;
    // Bind first, so the ports are known (and taken) while the model loads.
    let (grpc_listener, metrics_listener, http_listener, bound) = bind(&args).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_serving(&health, false).await;

    // The gRPC server comes up at once: health answers NOT_SERVING and Teacher
    // calls UNAVAILABLE until the model is loaded and warmed up.
    let grpc = TeacherService::new(args.max_concurrent_requests);
    let router = build_router(&args, grpc.clone(), health_service)?;
    let (goaway_tx, goaway_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = goaway_rx.await;
    }));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let metrics_stop = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    let metrics_task = tokio::spawn(m::serve(metrics_listener, handle, metrics_stop));
    let http = match http_listener {
        Some(listener) => Some(start_http(&args, listener, grpc.clone(), stop_tx.subscribe())?),
        None => None,
    };
    // Stable line for scripts and tests: where to connect.
    let http_addr = bound.http.map(|a| format!(", HTTP on {a}")).unwrap_or_default();
    println!(
        "logitd: gRPC on {}{http_addr}, metrics on {}",
        bound.grpc,
        m::describe_addr(bound.metrics)
    );
    on_bound(bound);

    let (info, engine) = load_and_warm_up(&args).await?;
    let (scheduler, threads) = WorkerThreads::start(
        engine,
        args.max_queue_tokens as usize,
        args.model.max_batch_tokens as usize,
        args.max_wait(),
    );
    grpc.set_ready(LoadedService::new(scheduler.clone(), limits(&args, &info), info.clone()));
    set_serving(&health, true).await;
    if let Some((front, _)) = &http {
        front.set_tokenizer(http_tokenizer(&args).await);
        front.set_serving(true);
    }
    tracing::info!(grpc_addr = %bound.grpc, metrics_addr = %bound.metrics, model = %info.model_id, "serving");

    shutdown.await;
    if let Some((front, _)) = &http {
        front.set_serving(false);
    }
    drain(&args, &health, &scheduler, threads).await;
    stop_grpc(server, goaway_tx).await?;
    let _ = stop_tx.send(true);
    if let Some((_, task)) = http {
        stop_http(task).await;
    }
    let _ = metrics_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The HTTP front's serving task.
type HttpTask = tokio::task::JoinHandle<Result<(), String>>;

/// The HTTP front on `listener`, sharing `grpc`'s service and call slots,
/// until `stop` turns true.
fn start_http(
    args: &ServeArgs,
    listener: TcpListener,
    grpc: TeacherService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(std::sync::Arc<http::HttpFront>, HttpTask), ServeError> {
    let front = http::HttpFront::new(
        grpc,
        BearerAuth::new(args.auth_token.as_deref()),
        args.max_message_bytes,
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(http::Tls {
            cert: read(cert)?,
            key: read(key)?,
            client_ca: args.tls_client_ca.as_deref().map(read).transpose()?,
        }),
        _ => None,
    };
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    // Configuration errors (a bad PEM) come back before serving starts.
    let task = tokio::spawn(http::serve(listener, front.clone(), tls, stopped));
    Ok((front, task))
}

/// The teacher's tokenizer for the HTTP front's text prompts and decoded
/// tokens, or none (then token ids only, and decoded tokens are null).
async fn http_tokenizer(args: &ServeArgs) -> Option<tokenizers::Tokenizer> {
    let model = args.model.model.clone().unwrap_or_else(demo_teacher);
    let loaded = tokio::task::spawn_blocking(move || load_tokenizer(&model, None)).await.ok()?;
    match loaded {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no tokenizer for the HTTP front: text prompts are refused, decoded tokens are null");
            None
        }
    }
}

/// Waits (5 s at most) for the HTTP front to finish its last answers.
async fn stop_http(task: HttpTask) {
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP front stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP front task failed"),
        Err(_) => tracing::warn!("HTTP calls still open 5 s after the drain; exiting"),
    }
}

/// Binds the gRPC, metrics and (with --http-listen) HTTP ports.
async fn bind(
    args: &ServeArgs,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>, Bound), ServeError> {
    let grpc_listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| ServeError::Io(format!("--listen {}: {e}", args.listen)))?;
    let metrics_listener = TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| ServeError::Io(format!("--metrics-listen {}: {e}", args.metrics_listen)))?;
    let http_listener = match args.http_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Io(format!("--http-listen {addr}: {e}")))?,
        ),
        None => None,
    };
    let grpc = grpc_listener.local_addr().map_err(|e| ServeError::Io(e.to_string()))?;
    let metrics = metrics_listener.local_addr().map_err(|e| ServeError::Io(e.to_string()))?;
    let http = match &http_listener {
        Some(l) => Some(l.local_addr().map_err(|e| ServeError::Io(e.to_string()))?),
        None => None,
    };
    Ok((grpc_listener, metrics_listener, http_listener, Bound { grpc, metrics, http }))
}

/// Health of the whole server and of the Teacher service.
async fn set_serving(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_service_status("", ServingStatus::Serving).await;
        health.set_serving::<TeacherServer<TeacherService>>().await;
    } else {
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_not_serving::<TeacherServer<TeacherService>>().await;
    }
}

/// The gRPC router: TLS (and client certificates), message-size limits,
/// bearer-token auth on the Teacher service, reflection, health, and named
/// UNIMPLEMENTED answers.
fn build_router(
    args: &ServeArgs,
    grpc: TeacherService,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::transport::server::Router, ServeError> {
    let teacher = TeacherServer::new(grpc)
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let auth = BearerAuth::new(args.auth_token.as_deref());
    // Reflection in both versions: grpcurl and older tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(logitd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Deadlines (the client's grpc-timeout, else --request-timeout-s) are
    // enforced per request by the service, which answers DEADLINE_EXCEEDED.
    let mut builder = Server::builder().http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &args.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(tls)?;
    }
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(teacher, auth))
        .into_axum_router()
        .layer(axum::middleware::from_fn(name_unimplemented));
    Ok(builder.add_routes(routes.into()))
}

/// Loads the model and warms the engine up, off the async threads; reports
/// the model in the metrics. Returns what GetModelInfo answers and the engine
/// (with `--inject-engine-fault` applied).
async fn load_and_warm_up(args: &ServeArgs) -> Result<(ModelInfo, Engine), ServeError> {
    let model_args = args.model.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = load_model(&model_args)?;
        device::settle(loaded.teacher.device())?;
        Ok::<_, ServeError>(loaded)
    })
    .await
    .map_err(|source| ServeError::Task { task: "model loading", source })??;
    let info = loaded.info.clone();
    metrics::gauge!(m::MODEL_INFO,
        "model_id" => info.model_id.clone(), "architecture" => info.architecture.clone(),
        "dtype" => info.dtype.clone(), "device" => info.device.clone(),
        "vocab_size" => info.vocab_size.to_string())
    .set(1.0);
    metrics::gauge!(m::QUEUE_CAPACITY_TOKENS).set(args.max_queue_tokens as f64);

    let head_chunk_rows = args.model.head_chunk_rows;
    let min_shared_prefix = args.min_shared_prefix;
    let mut engine = tokio::task::spawn_blocking(move || {
        let mut engine = Engine::new(loaded.teacher, head_chunk_rows)
            .map_err(crate::scoring::EngineError::from)?;
        engine.set_min_shared_prefix(min_shared_prefix);
        engine.warm_up()?;
        Ok::<_, ServeError>(engine)
    })
    .await
    .map_err(|source| ServeError::Task { task: "warm-up", source })??;
    if !args.inject_engine_fault.is_empty() {
        tracing::warn!(batches = ?args.inject_engine_fault, "test fault injection is on");
        engine.inject_faults(args.inject_engine_fault.clone());
    }
    Ok((info, engine))
}

/// The limits requests are validated against.
fn limits(args: &ServeArgs, info: &ModelInfo) -> Limits {
    Limits {
        vocab_size: info.vocab_size,
        max_sequence_length: info.max_sequence_length,
        default_num_samples: info.default_num_samples,
        max_num_samples: info.max_num_samples,
        max_candidates: info.max_candidates,
        max_request_tokens: args.max_queue_tokens as usize,
        default_timeout: Duration::from_secs(args.request_timeout_s),
    }
}

/// On a signal: NOT_SERVING and new work refused (UNAVAILABLE) while queued
/// and running work finishes, bounded by the drain timeout.
async fn drain(
    args: &ServeArgs,
    health: &tonic_health::server::HealthReporter,
    scheduler: &SchedulerHandle,
    threads: WorkerThreads,
) {
    let drain = Duration::from_secs(args.drain_timeout_s);
    tracing::info!(drain_timeout_s = drain.as_secs(), "shutting down: draining");
    set_serving(health, false).await;
    scheduler.close();
    let mut join = tokio::task::spawn_blocking(move || threads.join());
    if tokio::time::timeout(drain, &mut join).await.is_err() {
        tracing::warn!("drain timeout reached; stopping with work still queued");
    }
}

/// GOAWAY, then waits (5 s at most) until the server sent the last answers.
async fn stop_grpc(
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    goaway: tokio::sync::oneshot::Sender<()>,
) -> Result<(), ServeError> {
    let _ = goaway.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(source)) => return Err(ServeError::Task { task: "gRPC server", source }),
        Err(_) => tracing::warn!("calls still open 5 s after GOAWAY; exiting"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// tonic answers an unknown service or method with UNIMPLEMENTED and no message;
/// this names the path the client called (a method name, never request data).
/// Only trailers-only answers carry grpc-status in their headers, so answers of
/// real calls pass untouched.
async fn name_unimplemented(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let unimplemented = headers.get("grpc-status").is_some_and(|v| v == "12");
    let silent = headers.get("grpc-message").is_none_or(|v| v.is_empty());
    if unimplemented && silent {
        let message = unimplemented_message(&path);
        if let Ok(value) = axum::http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", value);
        }
    }
    response
}

/// `unknown method <path>`, percent-encoded as grpc-message requires and cut to
/// 256 bytes of path so that a long path cannot make a long header.
fn unimplemented_message(path: &str) -> String {
    let mut message = String::from("unknown%20method%20");
    for &b in path.as_bytes().iter().take(256) {
        if (0x20..0x7f).contains(&b) && b != b'%' && b != b' ' {
            message.push(b as char);
        } else {
            message.push_str(&format!("%{b:02X}"));
        }
    }
    message
}

#[cfg(test)]
mod unimplemented_tests {
    use super::unimplemented_message;

    #[test]
    fn the_message_names_the_path_percent_encoded_and_bounded() {
        assert_eq!(unimplemented_message("/a.B/C"), "unknown%20method%20/a.B/C");
        assert_eq!(unimplemented_message("/a b%\u{e9}"), "unknown%20method%20/a%20b%25%C3%A9");
        let long = format!("/{}", "x".repeat(1000));
        assert_eq!(unimplemented_message(&long).len(), "unknown%20method%20".len() + 256);
    }
}
