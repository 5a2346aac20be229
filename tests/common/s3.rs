//! An S3-protocol server in the test process: s3s-fs over a temporary
//! folder, served over TCP on 127.0.0.1 with SigV4 authentication, so tests
//! exercise the same HTTP path a real MinIO or AWS endpoint would.
//!
//! ```ignore
//! let s3 = common::s3::start_s3().await;
//! s3.create_bucket("photos").await;
//! let store = s3.store(); // imgfunc::store::S3Store
//! ```

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use imgfunc::store::S3Store;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use std::path::PathBuf;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The access key every test server accepts.
pub const ACCESS_KEY: &str = "imgfunc-test-ak";
/// The secret key every test server accepts.
pub const SECRET_KEY: &str = "imgfunc-test-sk";
/// The region test clients sign for (s3s ignores it, signing needs one).
pub const REGION: &str = "us-east-1";

/// A running in-process S3 server. It stops accepting connections, and its
/// folder is removed, when this value is dropped.
pub struct S3Server {
    /// Base URL, `http://127.0.0.1:<port>`; use path-style addressing.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// The folder s3s-fs serves: one sub-folder per bucket, so tests can
    /// look at what was written.
    pub root: PathBuf,
    _dir: TempDir,
    handle: JoinHandle<()>,
}

/// Starts a server on a free port of 127.0.0.1 in the current tokio runtime.
/// Panics if it cannot: a test without its server cannot run anyway.
pub async fn start_s3() -> S3Server {
    let dir = tempfile::tempdir().expect("create a temporary folder for s3s-fs");
    let root = dir.path().to_path_buf();
    let fs = s3s_fs::FileSystem::new(&root).expect("open s3s-fs over the temporary folder");
    let service = {
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        builder.build()
    };

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener
        .local_addr()
        .expect("local address of the listener");
    let handle = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                // A client hanging up mid-request is not the test's concern.
                let _ = conn.await;
            });
        }
    });

    S3Server {
        endpoint: format!("http://{addr}"),
        access_key: ACCESS_KEY.to_owned(),
        secret_key: SECRET_KEY.to_owned(),
        root,
        _dir: dir,
        handle,
    }
}

/// An aws-sdk-s3 client for any S3 endpoint with static keys and path-style
/// addressing.
pub fn s3_client(endpoint: &str, access_key: &str, secret_key: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(access_key, secret_key, None, None, "test"))
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

impl S3Server {
    /// A client signed with this server's keys.
    pub fn client(&self) -> Client {
        s3_client(&self.endpoint, &self.access_key, &self.secret_key)
    }

    /// An imgfunc store over this server.
    pub fn store(&self) -> S3Store {
        S3Store::new(self.client(), self.endpoint.clone())
    }

    /// Creates a bucket, panicking on failure. s3s checks names as AWS does:
    /// 3 to 63 characters of a-z, 0-9, `.` and `-`.
    pub async fn create_bucket(&self, bucket: &str) {
        self.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.handle.abort();
    }
}
