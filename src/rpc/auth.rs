//! The shared token on every RPC: `authorization: Bearer <token>` metadata, checked by the
//! server and attached by clients. No token configured = no check.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::secret::same;

/// Checks (server) or attaches (client) the token.
#[derive(Debug, Clone, Default)]
pub struct Token(pub Option<String>);

impl Token {
    fn header(&self) -> Option<String> {
        self.0.as_ref().map(|t| format!("Bearer {t}"))
    }
}

/// Server side: rejects calls without the right token.
#[derive(Debug, Clone, Default)]
pub struct CheckToken(pub Token);

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = self.0.header() else {
            return Ok(req);
        };
        match req.metadata().get("authorization").map(|v| v.as_bytes()) {
            Some(got) if same(got, expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated("missing token (authorization: Bearer ...)")),
        }
    }
}

/// Client side: adds the token to every call.
#[derive(Debug, Clone, Default)]
pub struct AddToken(pub Token);

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = self.0.header() {
            let value = MetadataValue::try_from(h).map_err(|_| Status::invalid_argument("token is not valid ASCII"))?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interceptor_wants_the_whole_token() {
        let mut check = CheckToken(Token(Some("abc".into())));
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", MetadataValue::from_static("Bearer abc"));
        assert!(check.call(req).is_ok());
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", MetadataValue::from_static("Bearer ab"));
        assert_eq!(
            check.call(req).expect_err("prefix").code(),
            tonic::Code::Unauthenticated
        );
    }
}
