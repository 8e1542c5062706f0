//! Bearer tokens with two scopes: `read` for queries, `admin` for actions (and queries). Tokens
//! are configured as `name:scope:secret` and kept only as SHA-256 digests, compared in constant
//! time. The token's name is the actor recorded in the audit log.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do. `Admin` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    Read,
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// The caller of a request, put in the request's extensions by [`require`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    pub(crate) name: String,
    pub(crate) scope: Scope,
}

pub(crate) struct Token {
    name: String,
    scope: Scope,
    digest: [u8; 32],
}

/// The configured tokens, or `Disabled` for local development.
#[derive(Clone)]
pub(crate) enum Auth {
    Tokens(Arc<Vec<Token>>),
    Disabled,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Tokens(tokens) => {
                let names: Vec<String> = tokens.iter().map(|t| format!("{}:{}", t.name, t.scope.as_str())).collect();
                f.debug_tuple("Tokens").field(&names).finish()
            }
            Auth::Disabled => f.write_str("Disabled"),
        }
    }
}

/// Whether tokens are checked, put in the request's extensions by [`require`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthMode {
    Tokens,
    Disabled,
}

/// Shortest secret accepted, so a token cannot be guessed.
pub(crate) const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AuthConfigError {
    #[error(
        "API_TOKENS is empty: set it to name:scope:secret entries (scope read or admin), or set AUTH_DISABLED=true \
         for local development only"
    )]
    NoTokens,
    #[error("API_TOKENS entry {position} must be name:scope:secret (scope read or admin)")]
    Malformed { position: usize },
    #[error("API_TOKENS entry {position} ({name}): scope must be read or admin, not {scope:?}")]
    BadScope { position: usize, name: String, scope: String },
    #[error("API_TOKENS entry {position} ({name}): the secret must have at least {MIN_SECRET_LEN} characters")]
    ShortSecret { position: usize, name: String },
    #[error("API_TOKENS: the name {0:?} is used twice")]
    DuplicateName(String),
    #[error("API_TOKENS: two entries have the same secret")]
    DuplicateSecret,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Auth {
    /// Parses `name:scope:secret` entries separated by commas or newlines. Error messages never
    /// contain a secret.
    pub(crate) fn from_config(tokens: &str, disabled: bool) -> Result<Auth, AuthConfigError> {
        if disabled {
            return Ok(Auth::Disabled);
        }
        let mut parsed: Vec<Token> = Vec::new();
        let entries = tokens.split([',', '\n']).map(str::trim).filter(|e| !e.is_empty());
        for (index, entry) in entries.enumerate() {
            let position = index + 1;
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(scope), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(AuthConfigError::Malformed { position });
            };
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
            if !valid_name {
                return Err(AuthConfigError::Malformed { position });
            }
            let scope = Scope::parse(scope).ok_or_else(|| AuthConfigError::BadScope {
                position,
                name: name.to_owned(),
                scope: scope.to_owned(),
            })?;
            if secret.chars().count() < MIN_SECRET_LEN {
                return Err(AuthConfigError::ShortSecret { position, name: name.to_owned() });
            }
            let token = Token { name: name.to_owned(), scope, digest: digest(secret) };
            if parsed.iter().any(|t| t.name == token.name) {
                return Err(AuthConfigError::DuplicateName(token.name));
            }
            if parsed.iter().any(|t| t.digest == token.digest) {
                return Err(AuthConfigError::DuplicateSecret);
            }
            parsed.push(token);
        }
        if parsed.is_empty() {
            return Err(AuthConfigError::NoTokens);
        }
        Ok(Auth::Tokens(Arc::new(parsed)))
    }

    /// Who presented `secret`, if anyone. Every token is compared, in constant time.
    fn principal(&self, secret: &str) -> Option<Principal> {
        let Auth::Tokens(tokens) = self else { return None };
        let presented = digest(secret);
        let mut found = None;
        for token in tokens.iter() {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(Principal { name: token.name.clone(), scope: token.scope });
            }
        }
        found
    }
}

/// The scope a request needs: reading needs `read`, anything else `admin`.
fn needed(method: &Method) -> Scope {
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        Scope::Read
    } else {
        Scope::Admin
    }
}

fn refuse(status: StatusCode, kind: &'static str, detail: String) -> Response {
    let mut response = saga_runtime::health::problem(status, kind, detail);
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"saga-orchestrator\""));
    }
    response
}

/// Middleware: lets a request through only with a token of the scope it needs.
pub(crate) async fn require(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let principal = match &auth {
        Auth::Disabled => Principal { name: "anonymous".to_owned(), scope: Scope::Admin },
        Auth::Tokens(_) => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim);
            let Some(secret) = presented else {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this API needs an Authorization: Bearer <token> header".to_owned(),
                );
            };
            match auth.principal(secret) {
                Some(principal) => principal,
                None => {
                    return refuse(StatusCode::UNAUTHORIZED, "unauthorized", "the bearer token is not valid".to_owned())
                }
            }
        }
    };
    let scope = needed(request.method());
    if principal.scope < scope {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has scope {}; {} {} needs scope {}",
                principal.name,
                principal.scope.as_str(),
                request.method(),
                request.uri().path(),
                scope.as_str()
            ),
        );
    }
    request.extensions_mut().insert(principal);
    request.extensions_mut().insert(match auth {
        Auth::Disabled => AuthMode::Disabled,
        Auth::Tokens(_) => AuthMode::Tokens,
    });
    next.run(request).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_names_scopes_and_long_secrets() {
        let auth = Auth::from_config("alice:admin:0123456789abcdef, grafana:read:fedcba9876543210", false).unwrap();
        assert_eq!(auth.principal("0123456789abcdef"), Some(Principal { name: "alice".into(), scope: Scope::Admin }));
        assert_eq!(auth.principal("fedcba9876543210"), Some(Principal { name: "grafana".into(), scope: Scope::Read }));
        assert_eq!(auth.principal("0123456789abcdeX"), None);
        assert_eq!(auth.principal(""), None);
        // A secret may contain colons.
        let auth = Auth::from_config("ci:read:a:b:c:d:e:f:g:h:i", false).unwrap();
        assert!(auth.principal("a:b:c:d:e:f:g:h:i").is_some());
    }

    #[test]
    fn bad_token_configuration_is_refused_without_echoing_secrets() {
        let cases = [
            ("", AuthConfigError::NoTokens),
            (" , ", AuthConfigError::NoTokens),
            ("alice:admin", AuthConfigError::Malformed { position: 1 }),
            ("a b:admin:0123456789abcdef", AuthConfigError::Malformed { position: 1 }),
            (
                "alice:root:0123456789abcdef",
                AuthConfigError::BadScope { position: 1, name: "alice".into(), scope: "root".into() },
            ),
            ("alice:admin:short", AuthConfigError::ShortSecret { position: 1, name: "alice".into() }),
            (
                "alice:admin:0123456789abcdef,alice:read:fedcba9876543210",
                AuthConfigError::DuplicateName("alice".into()),
            ),
            ("a:admin:0123456789abcdef,b:read:0123456789abcdef", AuthConfigError::DuplicateSecret),
        ];
        for (config, want) in cases {
            let error = Auth::from_config(config, false).unwrap_err();
            assert_eq!(error, want, "{config:?}");
            assert!(!error.to_string().contains("0123456789abcdef"), "{error}");
        }
        assert!(matches!(Auth::from_config("", true), Ok(Auth::Disabled)));
    }

    #[test]
    fn reading_needs_read_and_everything_else_admin() {
        assert_eq!(needed(&Method::GET), Scope::Read);
        assert_eq!(needed(&Method::POST), Scope::Admin);
        assert_eq!(needed(&Method::DELETE), Scope::Admin);
        assert!(Scope::Admin > Scope::Read);
    }
}
