//! Envelope encryption: per-image data keys wrapped by tenant master keys.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::seal::parse_hex32;
use crate::{DedupScope, Error, Result, Salt};

/// A random 256-bit key that seals one manifest.
#[derive(Clone)]
pub struct DataKey(pub(crate) [u8; 32]);

/// A [`DataKey`] encrypted under a tenant's master key: nonce, ciphertext, tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey(pub Vec<u8>);

/// What a data key is bound to: the tenant whose master key wraps it and
/// the image it seals (a key service checks both, as its encryption
/// context, on every unwrap).
#[derive(Clone, Copy, Debug)]
pub struct KeyContext<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The image's name when it was imported (empty for manifests sealed
    /// before images were named in their envelope).
    pub image: &'a str,
}

/// Wraps and unwraps data keys with tenant master keys.
///
/// The default is [`LocalKeyring`]; at fleet scale a KMS client implements
/// the same calls, and the master keys never leave it.
pub trait KeyProvider: Send + Sync {
    /// A fresh data key for `ctx`, and the same key wrapped under the
    /// tenant's master key. By default a local random key, wrapped by
    /// [`KeyProvider::wrap`]; a key service makes both in one call.
    fn new_key(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey)> {
        let key = DataKey::generate();
        let wrapped = self.wrap(ctx, &key)?;
        Ok((key, wrapped))
    }
    /// Encrypts `key` under the tenant's master key.
    fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<WrappedKey>;
    /// Recovers a data key wrapped for the same context.
    fn unwrap(&self, ctx: &KeyContext, wrapped: &WrappedKey) -> Result<DataKey>;
}

/// The keys of a store: a [`KeyProvider`] for manifests, and the base salt
/// and dedup scope imports seal chunks with.
pub trait Keyring: KeyProvider {
    /// The store's base convergence salt (importers only: readers never
    /// need it).
    fn base_salt(&self) -> Result<Salt>;
    /// The dedup scope imports use unless told otherwise.
    fn dedup_scope(&self) -> DedupScope;
    /// Makes sure `tenant` can wrap keys (a local keyring makes the
    /// tenant's master key; a key service has them already).
    fn ensure_tenant(&mut self, tenant: &str) -> Result<()>;
    /// Where the keys are, for messages.
    fn describe(&self) -> String;
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> DataKey {
        DataKey(random32())
    }

    /// A key from its bytes (as a key service hands a data key back).
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    /// The key's bytes (for a key service to wrap).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

pub(crate) fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).expect("the OS random source works");
    b
}

pub(crate) fn random_nonce() -> [u8; 12] {
    let mut b = [0u8; 12];
    SystemRandom::new().fill(&mut b).expect("the OS random source works");
    b
}

/// AES-256-GCM with a random nonce: returns nonce || ciphertext || tag.
pub(crate) fn aead_seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce = random_nonce();
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"));
    let mut buf = plain.to_vec();
    k.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf).expect("AES-GCM sealing only fails for inputs over 64 GiB");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out
}

/// Opens what [`aead_seal`] made; `None` if it does not authenticate.
pub(crate) fn aead_open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 12 + 16 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(12);
    let nonce: [u8; 12] = nonce.try_into().ok()?;
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"));
    let mut buf = ct.to_vec();
    let len = k.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf).ok()?.len();
    buf.truncate(len);
    Some(buf)
}

/// The default key provider: a JSON file of mode 0600 holding the store's
/// convergence salt and one master key per tenant.
///
/// Tenants are created on first import. Concurrent processes serialise
/// changes with an advisory lock, and the file is replaced atomically.
pub struct LocalKeyring {
    path: PathBuf,
    file: KeyringFile,
    salt: Salt,
}

#[derive(Serialize, Deserialize, Clone)]
struct KeyringFile {
    format: u32,
    salt: String,
    tenants: BTreeMap<String, String>,
    #[serde(default)]
    dedup_scope: DedupScope,
}

impl LocalKeyring {
    /// Opens the keyring at `path`; [`Error::KeyringMissing`] if there is none.
    /// Never writes.
    pub fn open(path: &Path) -> Result<LocalKeyring> {
        let kerr = |reason: String| Error::Keyring { path: path.display().to_string(), reason };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::KeyringMissing { path: path.display().to_string() }),
            Err(e) => return Err(kerr(e.to_string())),
        };
        let file = serde_json::from_slice::<KeyringFile>(&bytes).map_err(|e| kerr(e.to_string()))?;
        if file.format != 1 {
            return Err(kerr(format!("unsupported keyring format {}", file.format)));
        }
        let salt = Salt::from_bytes(parse_hex32(&file.salt, "salt").map_err(|e| kerr(e.to_string()))?);
        Ok(LocalKeyring { path: path.to_owned(), file, salt })
    }

    /// Creates a keyring at `path` with a fresh salt and no tenants; fails
    /// if one is there already (it would orphan every manifest it opens).
    pub fn create(path: &Path) -> Result<LocalKeyring> {
        LocalKeyring::create_scoped(path, DedupScope::Global)
    }

    /// [`LocalKeyring::create`], with the store's default dedup scope.
    pub fn create_scoped(path: &Path, scope: DedupScope) -> Result<LocalKeyring> {
        let kerr = |reason: String| Error::Keyring { path: path.display().to_string(), reason };
        let _lock = Lock::take(path).map_err(|e| kerr(format!("cannot lock: {e}")))?;
        let f = KeyringFile { format: 1, salt: hex::encode(random32()), tenants: BTreeMap::new(), dedup_scope: scope };
        write_private(path, &f, false).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => kerr("a keyring is there already; it is never replaced".into()),
            _ => kerr(format!("cannot create: {e}")),
        })?;
        LocalKeyring::open(path)
    }

    /// Where the keyring lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store's base convergence salt.
    pub fn salt(&self) -> &Salt {
        &self.salt
    }

    /// The tenants that have a master key.
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.file.tenants.keys().map(String::as_str)
    }

    /// Makes sure `tenant` has a master key, creating and persisting one.
    pub fn ensure_tenant(&mut self, tenant: &str) -> Result<()> {
        if self.file.tenants.contains_key(tenant) {
            return Ok(());
        }
        let kerr = |reason: String| Error::Keyring { path: self.path.display().to_string(), reason };
        let _lock = Lock::take(&self.path).map_err(|e| kerr(format!("cannot lock: {e}")))?;
        // Re-read under the lock: another process may have added tenants.
        let bytes = fs::read(&self.path).map_err(|e| kerr(e.to_string()))?;
        let mut file: KeyringFile = serde_json::from_slice(&bytes).map_err(|e| kerr(e.to_string()))?;
        file.tenants.entry(tenant.to_owned()).or_insert_with(|| hex::encode(random32()));
        write_private(&self.path, &file, true).map_err(|e| kerr(format!("cannot write: {e}")))?;
        self.file = file;
        Ok(())
    }

    fn master(&self, tenant: &str) -> Result<[u8; 32]> {
        let hex = self.file.tenants.get(tenant).ok_or_else(|| Error::UnknownTenant(tenant.to_owned()))?;
        parse_hex32(hex, "tenant key")
    }
}

// The wrap binds the tenant only (not the image), as before images were
// named in envelopes: old manifests keep opening.
impl KeyProvider for LocalKeyring {
    fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> Result<WrappedKey> {
        let master = self.master(ctx.tenant)?;
        Ok(WrappedKey(aead_seal(&master, ctx.tenant.as_bytes(), &key.0)))
    }

    fn unwrap(&self, ctx: &KeyContext, wrapped: &WrappedKey) -> Result<DataKey> {
        let tenant = ctx.tenant;
        let master = self.master(tenant)?;
        let plain = aead_open(&master, tenant.as_bytes(), &wrapped.0).ok_or_else(|| Error::ManifestOpen { tenant: tenant.to_owned() })?;
        let key: [u8; 32] = plain.try_into().map_err(|_| Error::ManifestOpen { tenant: tenant.to_owned() })?;
        Ok(DataKey(key))
    }
}

impl Keyring for LocalKeyring {
    fn base_salt(&self) -> Result<Salt> {
        Ok(self.salt.clone())
    }

    fn dedup_scope(&self) -> DedupScope {
        self.file.dedup_scope
    }

    fn ensure_tenant(&mut self, tenant: &str) -> Result<()> {
        LocalKeyring::ensure_tenant(self, tenant)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Writes the keyring to a temporary file of mode 0600, syncs it and puts
/// it in place: replacing what is there, or (`replace` false) only if
/// nothing is, atomically (a hard link fails if the name is taken).
fn write_private(path: &Path, file: &KeyringFile, replace: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(file).expect("keyring serialises"))?;
    f.sync_all()?;
    if replace {
        fs::rename(&tmp, path)?;
    } else {
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        linked?;
    }
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// An exclusive advisory lock on `<keyring>.lock`, released on drop.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> std::io::Result<Lock> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path.with_extension("lock"))?;
        // SAFETY: flock takes a valid open descriptor owned by `f`.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Lock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keyring_is_private_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        assert!(matches!(LocalKeyring::open(&path), Err(Error::KeyringMissing { .. })));
        assert!(!path.exists(), "opening never creates");
        let mut ring = LocalKeyring::create(&path).unwrap();
        assert!(LocalKeyring::create(&path).is_err(), "an existing keyring is never replaced");
        ring.ensure_tenant("acme").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let key = DataKey::generate();
        let acme = KeyContext { tenant: "acme", image: "app" };
        let wrapped = ring.wrap(&acme, &key).unwrap();
        let again = LocalKeyring::open(&path).unwrap();
        assert_eq!(again.unwrap(&acme, &wrapped).unwrap().0, key.0);
        assert_eq!(again.salt().id(), ring.salt().id());
    }

    #[test]
    fn other_tenant_cannot_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = LocalKeyring::create(&dir.path().join("k.json")).unwrap();
        ring.ensure_tenant("a").unwrap();
        ring.ensure_tenant("b").unwrap();
        let ctx = |tenant| KeyContext { tenant, image: "app" };
        let wrapped = ring.wrap(&ctx("a"), &DataKey::generate()).unwrap();
        assert!(ring.unwrap(&ctx("b"), &wrapped).is_err());
        assert!(matches!(ring.unwrap(&ctx("c"), &wrapped), Err(Error::UnknownTenant(_))));
    }
}
