//! Bearer-token authentication (`--auth-token`), shared by the gRPC
//! interceptor and the HTTP front.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::error::{AuthError, ServiceError};

/// Checks `authorization: Bearer <token>` in constant time: the SHA-256 of
/// what was sent is compared with that of the token, so neither the token's
/// bytes nor its length show in the time taken.
#[derive(Clone)]
pub struct BearerAuth(Option<[u8; 32]>);

impl BearerAuth {
    /// Checks against `token` (none: every call passes).
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| Sha256::digest(t.as_bytes()).into()))
    }

    /// Checks the `authorization` value sent (gRPC metadata or HTTP header).
    pub fn check(&self, value: Option<&[u8]>) -> Result<(), AuthError> {
        let Some(expected) = &self.0 else { return Ok(()) };
        let Some(value) = value else { return Err(AuthError::Missing) };
        let token = value.strip_prefix(b"Bearer ").unwrap_or(b"");
        let sent: [u8; 32] = Sha256::digest(token).into();
        if bool::from(sent.ct_eq(expected)) { Ok(()) } else { Err(AuthError::Invalid) }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let value = req.metadata().get("authorization").map(|v| v.as_bytes());
        self.check(value).map_err(|e| ServiceError::from(e).into()).map(|()| req)
    }
}
