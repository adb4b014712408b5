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
        Pki::issued(name, |_| {})
    }

    /// A new CA and a certificate it issued that expired in 2001.
    pub fn expired(name: &str) -> Pki {
        Pki::issued(name, |leaf| {
            leaf.not_before = rcgen::date_time_ymd(2000, 1, 1);
            leaf.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
    }

    /// A new CA and a certificate it issued, its parameters changed by `edit`.
    fn issued(name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Pki {
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
        edit(&mut leaf_params);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        Pki::written(name, ca.pem(), leaf.pem(), leaf_key.serialize_pem())
    }

    /// A CA that serves its own certificate (for 127.0.0.1) as the server's, a mistake
    /// of hand-made test set-ups.
    pub fn ca_as_server(name: &str) -> Pki {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "webpubsub test CA as server");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Pki::written(name, ca.pem(), ca.pem(), key.serialize_pem())
    }

    /// The server's certificate and key written to files of a directory named after
    /// `name` and the process.
    fn written(name: &str, ca_pem: String, cert_pem: String, key_pem: String) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("wps-client-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, cert_pem).unwrap();
        std::fs::write(&files.key, key_pem).unwrap();
        Pki { ca_pem, dir, files }
    }

    /// The CA's certificate written to a file of its own, for `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> std::path::PathBuf {
        let path = self.dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
