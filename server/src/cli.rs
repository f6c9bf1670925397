//! Command line: `logitd serve | info | sample`, every flag also read from a
//! `LOGITD_*` environment variable. Parsed once; the result is passed whole.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// logitd serves a teacher language model for knowledge distillation: trainers
/// send token sequences over gRPC and get back, for every position, k token ids
/// drawn from the teacher's softmax with their counts and log-probabilities.
#[derive(Debug, Parser)]
#[command(name = "logitd", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `logitd=debug`.
    #[arg(long, env = "LOGITD_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOGITD_LOG_JSON", global = true)]
    pub log_json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the teacher over gRPC, with Prometheus metrics on a second port.
    Serve(Box<ServeArgs>),
    /// Load the teacher and print what GetModelInfo would answer, as JSON.
    Info(ModelArgs),
    /// Offline first look: run the teacher on token ids and print, per
    /// position, the most frequently drawn ids with their counts and log-probabilities.
    Sample(SampleArgs),
}

/// How the teacher's weights are held, and the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// Keep what the file stores: a GGUF file's quantized matrices stay
    /// quantized, and on the CPU bf16 and f16 matrices stay in 16 bits
    /// (activations and accumulation in f32: the answers of `f32` in a
    /// quarter to a half of its memory). On a GPU, a Hugging Face directory
    /// computes in the bf16 or f16 it stores (bf16 for an f32 checkpoint).
    Auto,
    /// Every weight widened to 32-bit float (a GGUF file dequantised at load:
    /// about 4 bytes a parameter).
    F32,
    /// Weights and activations in bfloat16 (the GPU dtype; on the CPU it
    /// rounds every activation to 8 significant bits).
    Bf16,
    /// Weights and activations in IEEE half.
    F16,
}

/// Which model to load and where.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, *.safetensors) or a .gguf
    /// file. Without it, the cached demo teacher (SmolLM2-135M-Instruct, fetched
    /// once by tests/fetch-teachers.sh) is used.
    #[arg(long, env = "LOGITD_MODEL")]
    pub model: Option<PathBuf>,
    /// Device: `cpu` or `cuda:N` (needs a build with the `cuda` feature).
    #[arg(long, env = "LOGITD_DEVICE", default_value = "cpu")]
    pub device: String,
    /// How weights are held (see the values); GetModelInfo's `dtype` says what
    /// is served, e.g. `q4_k+q6_k/f32-acc` for a Q4_K_M file kept quantized.
    #[arg(long, env = "LOGITD_DTYPE", value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Model id reported to clients (default: the model's file or directory name,
    /// `@` and the first 12 hex digits of the weights' SHA-256, computed at load).
    #[arg(long, env = "LOGITD_MODEL_ID")]
    pub model_id: Option<String>,
    /// Longest sequence accepted, in tokens (default: the model's context
    /// length, at most --max-batch-tokens).
    #[arg(long, env = "LOGITD_MAX_SEQUENCE_LENGTH")]
    pub max_sequence_length: Option<u32>,
    /// k used when a request leaves num_samples at 0.
    #[arg(long, env = "LOGITD_DEFAULT_NUM_SAMPLES", default_value_t = 256)]
    pub default_num_samples: u32,
    /// Largest k a request may ask for.
    #[arg(long, env = "LOGITD_MAX_NUM_SAMPLES", default_value_t = 4096)]
    pub max_num_samples: u32,
    /// Most candidate ids a request may name for one position (their
    /// log-probabilities are returned; e.g. a student's own top-k ids).
    #[arg(long, env = "LOGITD_MAX_CANDIDATES", default_value_t = 1024)]
    pub max_candidates: u32,
    /// Most tokens packed into one forward pass.
    #[arg(long, env = "LOGITD_MAX_BATCH_TOKENS", default_value_t = 8192)]
    pub max_batch_tokens: u32,
    /// Rows per LM-head + sampler chunk (default: about 32 Mi logits per chunk).
    #[arg(long, env = "LOGITD_HEAD_CHUNK_ROWS")]
    pub head_chunk_rows: Option<usize>,
}

/// `logitd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    /// The model.
    pub model: ModelArgs,
    /// gRPC listen address.
    #[arg(long, env = "LOGITD_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Also serve the vLLM (`/v1/completions`), SGLang (`/generate`) and TRL
    /// (`/get_sequence_logprobs/`) scoring endpoints over HTTP on this
    /// address, from the same engine and queue (off by default).
    #[arg(long, env = "LOGITD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Prometheus metrics listen address (GET /metrics).
    #[arg(long, env = "LOGITD_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// Longest time a batch waits to fill up, in milliseconds.
    #[arg(long, env = "LOGITD_MAX_WAIT_MS", default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Most tokens waiting in the queue; a request that does not fit is
    /// refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOGITD_MAX_QUEUE_TOKENS", default_value_t = 65_536)]
    pub max_queue_tokens: u32,
    /// Deadline of a request when the client sets none, in seconds.
    #[arg(long, env = "LOGITD_REQUEST_TIMEOUT_S", default_value_t = 120)]
    pub request_timeout_s: u64,
    /// Sequences of one batch whose first N tokens are equal (e.g. G rollouts
    /// of one prompt, from one request or several) share their longest common
    /// prefix: the forward runs it once and every sequence gets its positions.
    /// 0 turns sharing off. Used by the fused CPU attention (f32 on the CPU);
    /// other devices run every sequence whole.
    #[arg(long, env = "LOGITD_MIN_SHARED_PREFIX", default_value_t = crate::engine::DEFAULT_MIN_SHARED_PREFIX)]
    pub min_shared_prefix: usize,
    /// Most Teacher calls handled at once (an open stream counts as one);
    /// further calls are refused at once with RESOURCE_EXHAUSTED. Health checks
    /// are not counted, so probes still answer under load.
    #[arg(long, env = "LOGITD_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    /// Largest request or response message, in bytes.
    #[arg(long, env = "LOGITD_MAX_MESSAGE_BYTES", default_value_t = 256 << 20)]
    pub max_message_bytes: usize,
    /// On SIGTERM/Ctrl-C, how long queued and running requests may take to
    /// finish before the server exits anyway, in seconds.
    #[arg(long, env = "LOGITD_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Require `authorization: Bearer <token>` on every Teacher call (health
    /// checks stay open for probes). Prefer the environment variable.
    #[arg(long, env = "LOGITD_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "LOGITD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "LOGITD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mutual TLS).
    #[arg(long, env = "LOGITD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Testing only: make the engine fail these batches (1-based, counted after
    /// the warm-up) as a device error would.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub inject_engine_fault: Vec<u64>,
}

impl ServeArgs {
    /// --max-wait-ms as a Duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// `logitd sample`.
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    /// The model.
    pub model: ModelArgs,
    /// Text to score, tokenised with the teacher's tokenizer (added as is: no
    /// special tokens are prepended).
    #[arg(long, required_unless_present = "tokens", conflicts_with = "tokens")]
    pub text: Option<String>,
    /// Token ids to score instead of text, comma-separated (e.g. `1,2,3`).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Vec<u32>,
    /// tokenizer.json to use instead of the model's own (needed for GGUF files
    /// whose tokenizer is not GPT-2 style BPE).
    #[arg(long, env = "LOGITD_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Draws per position.
    #[arg(long, default_value_t = 256)]
    pub num_samples: u32,
    /// Softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Seed of the generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ids shown per position.
    #[arg(long, default_value_t = 5)]
    pub show: usize,
}
