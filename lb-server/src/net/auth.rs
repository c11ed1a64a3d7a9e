//! Bearer tokens, as the admin port's mutations and the embedded registry's
//! API require them: `Authorization: Bearer <token>`, compared in constant
//! time (only the length of the expected token can be learned by timing).

use subtle::ConstantTimeEq;

/// Why a request was not authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Bearer` credentials at all.
    Missing,
    /// Credentials that do not match.
    Wrong,
}

impl AuthError {
    /// A message for the caller.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "missing Authorization: Bearer <token>",
            AuthError::Wrong => "wrong token",
        }
    }
}

/// Checks an `Authorization` header value against `expected`.
pub fn check_bearer(header: Option<&[u8]>, expected: &str) -> Result<(), AuthError> {
    let given = header
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii)
        .ok_or(AuthError::Missing)?;
    if bool::from(given.ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let t = "0123456789abcdef";
        assert_eq!(check_bearer(Some(b"Bearer 0123456789abcdef"), t), Ok(()));
        assert_eq!(check_bearer(Some(b"Bearer  0123456789abcdef "), t), Ok(()));
        assert_eq!(check_bearer(None, t), Err(AuthError::Missing));
        assert_eq!(check_bearer(Some(b"Basic xyz"), t), Err(AuthError::Missing));
        assert_eq!(
            check_bearer(Some(b"Bearer 0123456789abcdeX"), t),
            Err(AuthError::Wrong)
        );
        assert_eq!(check_bearer(Some(b"Bearer "), t), Err(AuthError::Wrong));
    }
}
