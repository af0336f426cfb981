//! Bearer tokens from a token file. The file holds each token's name,
//! scope and SHA-256 digest, never the token itself, so a copy of the file
//! (a backup, a support bundle) grants nothing. Tokens are 256 random
//! bits: a fast digest is enough, since nothing can be guessed offline.
//!
//! ```toml
//! [[tokens]]
//! name = "ops"
//! scope = "operator"
//! sha256 = "9f86d0…"
//! ```

use std::path::{Path, PathBuf};

use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use boilerhouse_core::auth::{Principal, Scope};

/// Every token starts with this, so a leaked one is recognisable (and
/// secret scanners can look for it).
pub const TOKEN_PREFIX: &str = "bht_";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    scope: String,
    sha256: String,
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// Cannot be read or written.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid.
    #[error("token file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry.
        reason: String,
    },
}

struct Known {
    name: String,
    scope: Scope,
    digest: [u8; 32],
}

/// The tokens the server accepts.
pub struct Tokens {
    known: Vec<Known>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.known.len())
            .finish()
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Tokens {
    /// Reads and validates a token file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let invalid = |reason: String| TokenFileError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        let file: TokenFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut known = Vec::with_capacity(file.tokens.len());
        for (i, entry) in file.tokens.into_iter().enumerate() {
            let at = format!("tokens[{i}] ({:?})", entry.name);
            if entry.name.trim().is_empty() {
                return Err(invalid(format!("{at}: name must not be empty")));
            }
            if known.iter().any(|k: &Known| k.name == entry.name) {
                return Err(invalid(format!("{at}: name is used twice")));
            }
            let scope = Scope::parse(&entry.scope).map_err(|e| invalid(format!("{at}: {e}")))?;
            let digest: [u8; 32] = hex::decode(&entry.sha256)
                .ok()
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| invalid(format!("{at}: sha256 must be 64 hex digits")))?;
            known.push(Known {
                name: entry.name,
                scope,
                digest,
            });
        }
        Ok(Self { known })
    }

    /// The principal a presented secret stands for, if any. Every entry is
    /// compared, in constant time, so the time taken says nothing about
    /// which digest came close.
    pub fn authenticate(&self, secret: &str) -> Option<Principal> {
        let presented = digest(secret);
        let mut found = None;
        for k in &self.known {
            if bool::from(k.digest.ct_eq(&presented)) {
                found = Some(k);
            }
        }
        found.map(|k| Principal::Token {
            name: k.name.clone(),
            scope: k.scope.clone(),
        })
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether the file lists no token at all.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// Makes a new token, adds its digest to `path` (creating the file, mode
/// 0600, if needed) and returns the secret, which is shown once and never
/// stored.
pub fn create_token(path: &Path, name: &str, scope: &Scope) -> Result<String, TokenFileError> {
    let io = |source| TokenFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str::<TokenFile>(&text).map_err(|e| TokenFileError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
        Err(e) => return Err(io(e)),
    };
    if name.trim().is_empty() || file.tokens.iter().any(|t| t.name == name) {
        return Err(TokenFileError::Invalid {
            path: path.to_owned(),
            reason: format!("a token named {name:?} exists already, or the name is empty"),
        });
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    file.tokens.push(TokenEntry {
        name: name.to_owned(),
        scope: scope.to_string(),
        sha256: hex::encode(digest(&secret)),
    });
    let text = toml::to_string(&file).map_err(|e| TokenFileError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    crate::auth::files::write_private(path, text.as_bytes()).map_err(io)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_tokens_authenticate_with_their_scope_and_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let admin = create_token(&path, "root", &Scope::Admin).unwrap();
        let tenant = create_token(&path, "acme", &Scope::parse("tenant:acme").unwrap()).unwrap();
        assert!(admin.starts_with(TOKEN_PREFIX) && admin.len() == 4 + 64);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&admin[4..]), "the secret is not at rest");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only the owner may read it: {mode:o}");

        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.authenticate(&admin),
            Some(Principal::Token {
                name: "root".into(),
                scope: Scope::Admin
            })
        );
        assert_eq!(
            tokens
                .authenticate(&tenant)
                .unwrap()
                .own_tenant()
                .unwrap()
                .as_str(),
            "acme"
        );
        assert_eq!(tokens.authenticate(&admin[..admin.len() - 1]), None);
        assert_eq!(tokens.authenticate(""), None);
        assert!(
            create_token(&path, "root", &Scope::Operator).is_err(),
            "names are unique"
        );
    }

    #[test]
    fn bad_files_name_the_entry_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        for (text, expected) in [
            (
                "[[tokens]]\nname = \"a\"\nscope = \"root\"\nsha256 = \"00\"\n",
                "tokens[0] (\"a\"): scope",
            ),
            (
                "[[tokens]]\nname = \"a\"\nscope = \"admin\"\nsha256 = \"zz\"\n",
                "sha256 must be 64 hex",
            ),
            (
                "[[tokens]]\nname = \"a\"\nscope = \"admin\"\nsecret = \"x\"\n",
                "secret",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Tokens::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains("tokens.toml"),
                "{err}"
            );
        }
    }
}
