//! TLS certificates for the tests, made with openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run;

/// A CA, a server certificate for localhost and 127.0.0.1, and client
/// certificates: `tenant-a` and `tenant-b` from the CA, `intruder` from
/// another CA. Client directories are laid out as libnbd and QEMU want them
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// Certificates in `dir`, the server's for `sans` (e.g.
    /// `DNS:localhost,IP:127.0.0.1`).
    pub fn make(dir: &Path, sans: &str) -> Certs {
        let script = r#"
set -eu
cd "$1"
ca() {
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1-key.pem" -out "$1-cert.pem" \
    -days 30 -sha256 -subj "/O=acme/CN=$1" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -addext "subjectKeyIdentifier=hash" 2>/dev/null
}
leaf() { # NAME CA SUBJECT EXTENSIONS
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1-key.pem" -out "$1.csr" -subj "$3" 2>/dev/null
  printf '%s\n' "$4" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2-cert.pem" -CAkey "$2-key.pem" -CAcreateserial -days 30 -sha256 -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
client_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
ca ca
ca other-ca
leaf server ca "/O=acme/CN=localhost" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$2"
leaf tenant-a ca "/O=acme/CN=tenant-a" "$client_ext"
leaf tenant-b ca "/O=acme/CN=tenant-b" "$client_ext"
leaf intruder other-ca "/O=acme/CN=tenant-a" "$client_ext"
for c in tenant-a tenant-b intruder; do
  mkdir -p "$c"
  cp ca-cert.pem "$c/ca-cert.pem"; cp "$c-cert.pem" "$c/client-cert.pem"; cp "$c-key.pem" "$c/client-key.pem"
done
"#;
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("sh").arg("-c").arg(script).arg("certs").arg(dir).arg(sans));
        Certs { dir: dir.to_owned() }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    /// The directory a libnbd or QEMU client of `who` uses.
    pub fn client(&self, who: &str) -> String {
        self.file(who)
    }
}
