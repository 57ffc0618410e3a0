//! A plain hyper-util client for the mock's tests: no layers, no retries.

#![allow(dead_code, unreachable_pub)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sync_mock::MockServer;

pub const KEY: &str = sync_mock::DEFAULT_KEY;

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    pub key: Option<String>,
}

impl Api {
    pub fn new(server: &MockServer) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: server.url(""),
            key: Some(KEY.to_owned()),
        }
    }

    pub fn with_key(mut self, key: Option<&str>) -> Self {
        self.key = key.map(str::to_owned);
        self
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.header("x-api-key", key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Answer {
            status: parts.status,
            headers: parts.headers,
            json,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn create(&self) -> Answer {
        self.create_with(&[], create_body(None)).await
    }

    pub async fn create_with(&self, headers: &[(&str, &str)], body: Value) -> Answer {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.send(Method::POST, "/v2/generate", &all, body.to_string())
            .await
    }
}

pub fn create_body(webhook: Option<&str>) -> Value {
    let mut body = json!({
        "model": "lipsync-2",
        "input": [
            {"type": "video", "url": "https://example.com/video.mp4"},
            {"type": "audio", "url": "https://example.com/audio.wav"}
        ],
        "options": {"sync_mode": "loop"}
    });
    if let Some(url) = webhook {
        body["webhookUrl"] = Value::from(url);
    }
    body
}
