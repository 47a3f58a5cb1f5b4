//! First-start duties: the data dir, the admin API key and the public addresses agents are
//! told.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngCore as _;
use store::{Change, SharedStore, StoreError};

use crate::auth::AdminKeys;
use crate::tls;

/// Where the admin key came from, for the banner. The key itself is only ever shown when it
/// was generated just now.
#[derive(Debug)]
pub enum AdminKeySource {
    /// `EDGEPLANE_ADMIN_API_KEY`.
    Environment,
    /// Read from `<data-dir>/admin-api-key`.
    File(PathBuf),
    /// Generated now and written to the file; shown once.
    Generated { key: String, path: PathBuf },
    /// Another replica created the keys in the shared store; this one has no file.
    Shared,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("admin key: {0}")]
    Store(#[from] StoreError),
    #[error("admin key file: {0}")]
    File(#[from] tls::TlsError),
    #[error("cannot read admin key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin key file {0} is empty")]
    Empty(PathBuf),
}

pub const ADMIN_KEY_FILE: &str = "admin-api-key";

/// Settles the admin API key at start-up and returns the keys the API accepts.
///
/// The key comes from `EDGEPLANE_ADMIN_API_KEY` (`given`), else from `<data-dir>/admin-api-key`,
/// else it is generated now and written to that file. Whichever it is REPLACES the stored set
/// of key hashes: the node's configured key is the only valid one after it starts, so changing
/// the key and restarting revokes the old one (a leaked key does not stay valid forever). In
/// cluster mode give every replica the same `EDGEPLANE_ADMIN_API_KEY`: each replica that starts
/// with its own key revokes the others'. Only when there is no key given, no file and the store
/// already holds keys (another replica created them) is the stored set left alone
/// ([`AdminKeySource::Shared`]).
pub async fn admin_key(
    store: &SharedStore,
    given: Option<&str>,
    data_dir: &Path,
) -> Result<(AdminKeys, AdminKeySource), BootstrapError> {
    let path = data_dir.join(ADMIN_KEY_FILE);
    let source = if let Some(key) = given.filter(|k| !k.is_empty()) {
        store
            .replace_admin_key_hashes(&[AdminKeys::hash(key)])
            .await?;
        AdminKeySource::Environment
    } else if path.exists() {
        let key = std::fs::read_to_string(&path).map_err(|source| BootstrapError::Read {
            path: path.clone(),
            source,
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(BootstrapError::Empty(path));
        }
        store
            .replace_admin_key_hashes(&[AdminKeys::hash(key)])
            .await?;
        AdminKeySource::File(path)
    } else if !store.admin_key_hashes().await?.is_empty() {
        AdminKeySource::Shared
    } else {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let key = format!(
            "ep_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        tls::write_private(&path, format!("{key}\n").as_bytes())?;
        store
            .replace_admin_key_hashes(&[AdminKeys::hash(&key)])
            .await?;
        AdminKeySource::Generated { key, path }
    };
    store.publish(Change::AdminKeys).await?;
    let keys = AdminKeys::default();
    keys.replace(store.admin_key_hashes().await?);
    Ok((keys, source))
}

/// Creates the data dir (and missing parents) with mode 0700, or tightens an existing one
/// that others can enter or read: it holds the embedded store (join secrets), the admin key
/// and the API's private key. Each of those files is 0600 itself; the dir keeps even their
/// names private and covers files made by hand or by older versions.
///
/// A dir of another owner cannot be tightened (a mounted volume, a group-shared dir): that is
/// logged, not fatal, since the files inside are private anyway.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => tracing::info!(
                path = %dir.display(),
                from = format!("{mode:04o}"),
                to = "0700",
                "tightened the data dir's mode: it holds secrets"
            ),
            Err(error) => tracing::warn!(
                path = %dir.display(),
                mode = format!("{mode:04o}"),
                %error,
                "cannot tighten the data dir's mode to 0700: it holds secrets"
            ),
        }
    }
    Ok(())
}

/// `https://<host>:<port>` where host is this machine's name if it resolves, else the
/// listener's IP, else 127.0.0.1.
pub fn default_public_url(api_addr: SocketAddr) -> String {
    let port = api_addr.port();
    let host = hostname()
        .filter(|h| {
            (h.as_str(), port)
                .to_socket_addrs()
                .is_ok_and(|mut a| a.next().is_some())
        })
        .unwrap_or_else(|| {
            if api_addr.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                api_addr.ip().to_string()
            }
        });
    format!("https://{host}:{port}")
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Host part of a URL (without brackets for IPv6).
pub fn url_host(url: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()?
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use store::embedded::EmbeddedStore;

    fn store(dir: &Path) -> SharedStore {
        Arc::new(EmbeddedStore::open(&dir.join("store")).expect("open store"))
    }

    #[tokio::test]
    async fn the_configured_key_revokes_earlier_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store(dir.path());

        let (keys, source) = admin_key(&store, Some("a"), dir.path())
            .await
            .expect("key a");
        assert!(matches!(source, AdminKeySource::Environment));
        assert!(keys.accepts("a"));

        // The operator rotates a leaked key and restarts: only the new one is valid.
        let (keys, _) = admin_key(&store, Some("b"), dir.path())
            .await
            .expect("key b");
        assert!(keys.accepts("b"));
        assert!(!keys.accepts("a"), "the old key must be revoked");
        assert_eq!(
            store.admin_key_hashes().await.expect("hashes"),
            vec![AdminKeys::hash("b")]
        );

        // No key given, no file, keys in the store (another replica's): left alone.
        let (keys, source) = admin_key(&store, None, dir.path()).await.expect("shared");
        assert!(matches!(source, AdminKeySource::Shared));
        assert!(keys.accepts("b"));

        // A key file replaces the set too.
        std::fs::write(dir.path().join(ADMIN_KEY_FILE), "from-file\n").expect("write key file");
        let (keys, source) = admin_key(&store, None, dir.path()).await.expect("file");
        assert!(matches!(source, AdminKeySource::File(_)));
        assert!(keys.accepts("from-file"));
        assert!(!keys.accepts("b"));
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn the_data_dir_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("nested/data");
        private_dir(&data).expect("create");
        assert_eq!(mode(&data), 0o700, "a new dir");
        private_dir(&data).expect("again");
        assert_eq!(mode(&data), 0o700, "an existing private dir");

        // A dir made by an older version (or by hand) with 0755 is tightened, its files kept.
        std::fs::write(data.join("kept"), "x").expect("write");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&data).expect("tighten");
        assert_eq!(mode(&data), 0o700, "an existing 0755 dir");
        assert_eq!(
            std::fs::read_to_string(data.join("kept")).expect("read"),
            "x"
        );

        // A file where the dir should be is an error.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").expect("write");
        assert!(private_dir(&blocker).is_err());
    }

    #[tokio::test]
    async fn a_generated_key_is_the_only_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store(dir.path());
        let (keys, source) = admin_key(&store, None, dir.path()).await.expect("generate");
        let AdminKeySource::Generated { key, path } = source else {
            panic!("expected a generated key, got {source:?}");
        };
        assert!(keys.accepts(&key));
        assert_eq!(std::fs::read_to_string(path).expect("key file").trim(), key);
        assert_eq!(
            store.admin_key_hashes().await.expect("hashes"),
            vec![AdminKeys::hash(&key)]
        );
    }
}
