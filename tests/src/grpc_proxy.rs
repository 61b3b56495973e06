//! A gRPC proxy in front of a real daemon for the contributor node's tests: `Auth` and
//! `Channels` calls are forwarded (with the caller's credentials), and a channel
//! subscription gets scripted events spliced in right after the daemon's first event —
//! tampered, replayed, regressing or equivocating states, delivered over the wire.

use futures::{Stream, StreamExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tribute_proto::v1 as pb;
use tribute_proto::v1::auth_client::AuthClient;
use tribute_proto::v1::channels_client::ChannelsClient;

#[derive(Clone)]
struct Forward {
    upstream: Channel,
    inject: Arc<Mutex<Vec<pb::ChannelEvent>>>,
}

/// The caller's request with its `authorization` header, to send upstream.
fn upstream_request<T>(req: Request<T>) -> Request<T> {
    let auth = req.metadata().get("authorization").cloned();
    let mut up = Request::new(req.into_inner());
    if let Some(a) = auth {
        up.metadata_mut().insert("authorization", a);
    }
    up
}

#[tonic::async_trait]
impl pb::auth_server::Auth for Forward {
    async fn get_challenge(
        &self,
        req: Request<pb::GetChallengeRequest>,
    ) -> Result<Response<pb::Challenge>, Status> {
        AuthClient::new(self.upstream.clone()).get_challenge(upstream_request(req)).await
    }
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        AuthClient::new(self.upstream.clone()).login(upstream_request(req)).await
    }
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        AuthClient::new(self.upstream.clone()).who_am_i(upstream_request(req)).await
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::ChannelEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::channels_server::Channels for Forward {
    type SubscribeChannelStream = Events;

    async fn subscribe_channel(
        &self,
        req: Request<pb::SubscribeChannelRequest>,
    ) -> Result<Response<Events>, Status> {
        let real = ChannelsClient::new(self.upstream.clone())
            .subscribe_channel(upstream_request(req))
            .await?
            .into_inner();
        // Taken once: only the first subscription gets the scripted events.
        let mut injected = Some(std::mem::take(&mut *self.inject.lock().unwrap()));
        let spliced = real.enumerate().flat_map(move |(i, ev)| {
            let mut out = vec![ev];
            if i == 0 {
                out.extend(injected.take().unwrap_or_default().into_iter().map(Ok));
            }
            futures::stream::iter(out)
        });
        Ok(Response::new(Box::pin(spliced)))
    }

    async fn get_channel(
        &self,
        req: Request<pb::GetChannelRequest>,
    ) -> Result<Response<pb::Channel>, Status> {
        ChannelsClient::new(self.upstream.clone()).get_channel(upstream_request(req)).await
    }

    async fn list_channels(
        &self,
        req: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        ChannelsClient::new(self.upstream.clone()).list_channels(upstream_request(req)).await
    }

    async fn report_misbehaviour(
        &self,
        req: Request<pb::ReportMisbehaviourRequest>,
    ) -> Result<Response<pb::ReportMisbehaviourResponse>, Status> {
        ChannelsClient::new(self.upstream.clone()).report_misbehaviour(upstream_request(req)).await
    }
}

/// A running proxy; stops when dropped.
pub struct GrpcProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcProxy {
    /// Proxies to the daemon behind `upstream`; `inject` is spliced into the first
    /// subscription after its first event.
    pub async fn start(upstream: Channel, inject: Vec<pb::ChannelEvent>) -> GrpcProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let f = Forward { upstream, inject: Arc::new(Mutex::new(inject)) };
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(pb::auth_server::AuthServer::new(f.clone()))
                .add_service(pb::channels_server::ChannelsServer::new(f))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        GrpcProxy { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
