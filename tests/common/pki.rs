//! A CA made in the test and a certificate of 127.0.0.1 it issued, in files of a
//! temporary directory (removed on drop), for an emulator serving `wss://`.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use webpubsub_emulator::TlsFiles;

pub struct Pki {
    /// The CA's certificate, for the client's `extra_ca_pem`.
    pub ca_pem: String,
    dir: std::path::PathBuf,
    /// The server's certificate and key, for the emulator's `Config::tls`.
    pub files: TlsFiles,
}

impl Pki {
    /// A new CA and certificate; `name` keeps the directories of tests apart.
    pub fn new(name: &str) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "webpubsub test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let dir =
            std::env::temp_dir().join(format!("wps-client-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, leaf.pem()).unwrap();
        std::fs::write(&files.key, leaf_key.serialize_pem()).unwrap();
        Pki {
            ca_pem: ca.pem(),
            dir,
            files,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
