//! JSON-RPC methods of the dev chain, answered with the JSON shapes bitcoind gives and that
//! lightning-block-sync 0.2 (`convert.rs`) and ldk-node 0.7.1 (`src/chain/bitcoind.rs`)
//! parse. Transport-free: the HTTP server hands in decoded request bodies.

use std::str::FromStr;

use ldk_node::bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use ldk_node::bitcoin::hex::DisplayHex;
use ldk_node::bitcoin::{Address, Amount, BlockHash, Network, OutPoint, Transaction, Txid};
use serde_json::{json, Map, Value};

use super::chain::{Chain, StoredBlock};
use super::{Shared, MAX_BLOCKS_PER_CALL};

/// Most requests one batch may carry.
const MAX_BATCH_LEN: usize = 1_000;

// bitcoind's RPC error codes (src/rpc/protocol.h).
const RPC_TYPE_ERROR: i64 = -3;
const RPC_INVALID_ADDRESS_OR_KEY: i64 = -5;
const RPC_INVALID_PARAMETER: i64 = -8;
const RPC_DESERIALIZATION_ERROR: i64 = -22;
const RPC_INVALID_REQUEST: i64 = -32600;
const RPC_METHOD_NOT_FOUND: i64 = -32601;
const RPC_INVALID_PARAMS: i64 = -32602;
const RPC_PARSE_ERROR: i64 = -32700;

/// An error object of a JSON-RPC response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RpcError {
    pub(crate) code: i64,
    pub(crate) message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }
}

/// Answers a request body: one request object, or a batch (array) of them.
pub(crate) fn handle_body(shared: &Shared, body: &[u8], now_unix_secs: u64) -> Value {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(Value::Null, RpcError::new(RPC_PARSE_ERROR, e.to_string()))
        }
    };
    match request {
        Value::Array(requests) if requests.len() > MAX_BATCH_LEN => error_response(
            Value::Null,
            RpcError::new(
                RPC_INVALID_REQUEST,
                format!("batch of more than {MAX_BATCH_LEN} requests"),
            ),
        ),
        Value::Array(requests) => Value::Array(
            requests.iter().map(|r| handle_request(shared, r, now_unix_secs)).collect(),
        ),
        request => handle_request(shared, &request, now_unix_secs),
    }
}

fn handle_request(shared: &Shared, request: &Value, now_unix_secs: u64) -> Value {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return error_response(id, RpcError::new(RPC_INVALID_REQUEST, "missing method"));
    };
    let no_params = Vec::new();
    let params = match request.get("params") {
        None | Some(Value::Null) => &no_params,
        Some(Value::Array(params)) => params,
        Some(_) => {
            return error_response(
                id,
                RpcError::new(RPC_INVALID_PARAMS, "the dev chain takes positional params only"),
            )
        }
    };
    match dispatch(shared, method, &Params(params), now_unix_secs) {
        Ok(result) => json!({ "result": result, "error": null, "id": id }),
        Err(e) => error_response(id, e),
    }
}

fn error_response(id: Value, error: RpcError) -> Value {
    json!({
        "result": null,
        "error": { "code": error.code, "message": error.message },
        "id": id,
    })
}

/// Runs one method. Every method is answered under one short lock of the chain.
pub(crate) fn dispatch(
    shared: &Shared,
    method: &str,
    params: &Params<'_>,
    now_unix_secs: u64,
) -> Result<Value, RpcError> {
    match method {
        "getblockchaininfo" => Ok(blockchain_info(&shared.lock_chain())),
        "getblockcount" => Ok(json!(shared.lock_chain().tip_height())),
        "getbestblockhash" => Ok(json!(shared.lock_chain().tip().hash.to_string())),
        "getblockhash" => {
            let height = params.u64(0, "height")?;
            let chain = shared.lock_chain();
            u32::try_from(height)
                .ok()
                .and_then(|h| chain.block_at(h))
                .map(|b| json!(b.hash.to_string()))
                .ok_or_else(|| RpcError::new(RPC_INVALID_PARAMETER, "Block height out of range"))
        }
        "getblockheader" => {
            let hash = params.block_hash(0)?;
            let verbose = params.bool_or(1, true)?;
            let chain = shared.lock_chain();
            let stored = find_block(&chain, &hash)?;
            if verbose {
                Ok(header_json(&chain, stored))
            } else {
                Ok(json!(serialize_hex(&stored.block.header)))
            }
        }
        "getblock" => {
            let hash = params.block_hash(0)?;
            let verbosity = params.verbosity_or(1, 1)?;
            let chain = shared.lock_chain();
            let stored = find_block(&chain, &hash)?;
            match verbosity {
                0 => Ok(json!(serialize_hex(&stored.block))),
                1 => Ok(block_json(&chain, stored)),
                _ => Err(RpcError::new(
                    RPC_INVALID_PARAMETER,
                    "the dev chain supports getblock verbosity 0 and 1 only",
                )),
            }
        }
        "gettxout" => {
            let txid = params.txid(0)?;
            let vout = u32::try_from(params.u64(1, "n")?)
                .map_err(|_| RpcError::new(RPC_INVALID_PARAMETER, "n out of range"))?;
            let include_mempool = params.bool_or(2, true)?;
            let chain = shared.lock_chain();
            Ok(match chain.txout(&OutPoint { txid, vout }, include_mempool) {
                // bitcoind answers `null` for spent and unknown outputs.
                None => Value::Null,
                Some(info) => json!({
                    "bestblock": chain.tip().hash.to_string(),
                    "confirmations": info.confirmations,
                    "value": info.txout.value.to_btc(),
                    "scriptPubKey": script_json(&info.txout.script_pubkey),
                    "coinbase": info.is_coinbase,
                }),
            })
        }
        "sendrawtransaction" => {
            let hex = params.str(0, "hexstring")?;
            let tx: Transaction = deserialize_hex(hex).map_err(|e| {
                RpcError::new(RPC_DESERIALIZATION_ERROR, format!("TX decode failed: {e}"))
            })?;
            let txid = shared
                .lock_chain()
                .accept_to_mempool(tx, now_unix_secs)
                .map_err(|reason| RpcError::new(reason.rpc_code(), reason.to_string()))?;
            tracing::debug!(%txid, "dev chain: transaction accepted into the mempool");
            Ok(json!(txid.to_string()))
        }
        "getrawtransaction" => {
            let txid = params.txid(0)?;
            let verbose = params.verbosity_or(1, 0)? > 0;
            let chain = shared.lock_chain();
            let (tx, block) = chain.transaction(&txid).ok_or_else(|| {
                RpcError::new(
                    RPC_INVALID_ADDRESS_OR_KEY,
                    "No such mempool or blockchain transaction",
                )
            })?;
            if !verbose {
                return Ok(json!(serialize_hex(tx)));
            }
            let mut obj = json!({
                "hex": serialize_hex(tx),
                "txid": txid.to_string(),
                "hash": tx.compute_wtxid().to_string(),
                "size": tx.total_size(),
                "vsize": tx.vsize(),
                "weight": tx.weight().to_wu(),
                "version": tx.version.0,
                "locktime": tx.lock_time.to_consensus_u32(),
            });
            if let (Some(block), Some(map)) = (block, obj.as_object_mut()) {
                map.insert("blockhash".into(), json!(block.hash.to_string()));
                map.insert("confirmations".into(), json!(chain.confirmations(block.height)));
                map.insert("time".into(), json!(block.block.header.time));
                map.insert("blocktime".into(), json!(block.block.header.time));
            }
            Ok(obj)
        }
        "getrawmempool" => {
            let verbose = params.bool_or(0, false)?;
            let chain = shared.lock_chain();
            let txids = chain.mempool_txids();
            if !verbose {
                return Ok(json!(txids.iter().map(Txid::to_string).collect::<Vec<_>>()));
            }
            let mut map = Map::new();
            for txid in txids {
                if let Some(entry) = mempool_entry_json(&chain, &txid) {
                    map.insert(txid.to_string(), entry);
                }
            }
            Ok(Value::Object(map))
        }
        "getmempoolentry" => {
            let txid = params.txid(0)?;
            let chain = shared.lock_chain();
            mempool_entry_json(&chain, &txid).ok_or_else(|| {
                RpcError::new(RPC_INVALID_ADDRESS_OR_KEY, "Transaction not in mempool")
            })
        }
        "getmempoolinfo" => {
            let chain = shared.lock_chain();
            let (size, vbytes, fees) = chain.mempool_totals();
            let min_fee_btc_per_kvb = btc_per_kvb(shared.settings.min_fee_rate_sat_per_vb);
            Ok(json!({
                "loaded": true,
                "size": size,
                "bytes": vbytes,
                "usage": vbytes,
                "total_fee": fees.to_btc(),
                "maxmempool": 300_000_000u64,
                "mempoolminfee": min_fee_btc_per_kvb,
                "minrelaytxfee": min_fee_btc_per_kvb,
                "incrementalrelayfee": min_fee_btc_per_kvb,
                "unbroadcastcount": 0,
                "fullrbf": false,
            }))
        }
        "estimatesmartfee" => {
            // The target is required by bitcoind; the answer is the same for all targets.
            let blocks = params.u64(0, "conf_target")?;
            Ok(json!({
                "feerate": btc_per_kvb(shared.settings.fee_rate_sat_per_vb),
                "blocks": blocks.max(1),
            }))
        }
        // Mining and the faucet: what a regtest bitcoind's `generatetoaddress` and wallet
        // `sendtoaddress` do, for the demo and for other processes.
        "generatetoaddress" => {
            let n = params.u64(0, "nblocks")?;
            let n =
                u32::try_from(n).ok().filter(|n| *n <= MAX_BLOCKS_PER_CALL).ok_or_else(|| {
                    RpcError::new(
                        RPC_INVALID_PARAMETER,
                        format!("nblocks above {MAX_BLOCKS_PER_CALL}"),
                    )
                })?;
            let address = params.address(1)?;
            let hashes = shared.mine(n, address.script_pubkey(), now_unix_secs);
            Ok(json!(hashes.iter().map(BlockHash::to_string).collect::<Vec<_>>()))
        }
        "sendtoaddress" => {
            let address = params.address(0)?;
            let amount = params.amount_btc(1)?;
            let txid = shared
                .lock_chain()
                .faucet(address.script_pubkey(), amount, now_unix_secs)
                .map_err(|reason| RpcError::new(reason.rpc_code(), reason.to_string()))?;
            Ok(json!(txid.to_string()))
        }
        _ => Err(RpcError::new(RPC_METHOD_NOT_FOUND, format!("Method not found: {method}"))),
    }
}

/// Positional parameters, with bitcoind's conventions: `null` means "use the default".
pub(crate) struct Params<'a>(pub(crate) &'a [Value]);

impl Params<'_> {
    fn get(&self, index: usize) -> Option<&Value> {
        self.0.get(index).filter(|v| !v.is_null())
    }

    fn required(&self, index: usize, name: &str) -> Result<&Value, RpcError> {
        self.get(index)
            .ok_or_else(|| RpcError::new(RPC_INVALID_PARAMS, format!("missing parameter {name}")))
    }

    fn str(&self, index: usize, name: &str) -> Result<&str, RpcError> {
        self.required(index, name)?
            .as_str()
            .ok_or_else(|| RpcError::new(RPC_TYPE_ERROR, format!("{name} must be a string")))
    }

    fn u64(&self, index: usize, name: &str) -> Result<u64, RpcError> {
        self.required(index, name)?.as_u64().ok_or_else(|| {
            RpcError::new(RPC_TYPE_ERROR, format!("{name} must be a non-negative integer"))
        })
    }

    fn bool_or(&self, index: usize, default: bool) -> Result<bool, RpcError> {
        match self.get(index) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(RpcError::new(RPC_TYPE_ERROR, "expected a boolean")),
        }
    }

    /// bitcoind takes verbosity either as a number or as the older boolean.
    fn verbosity_or(&self, index: usize, default: u64) -> Result<u64, RpcError> {
        match self.get(index) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(u64::from(*b)),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| RpcError::new(RPC_TYPE_ERROR, "verbosity must be a number")),
        }
    }

    fn block_hash(&self, index: usize) -> Result<BlockHash, RpcError> {
        BlockHash::from_str(self.str(index, "blockhash")?).map_err(|_| {
            RpcError::new(RPC_INVALID_PARAMETER, "blockhash must be 64 hex characters")
        })
    }

    fn txid(&self, index: usize) -> Result<Txid, RpcError> {
        Txid::from_str(self.str(index, "txid")?)
            .map_err(|_| RpcError::new(RPC_INVALID_PARAMETER, "txid must be 64 hex characters"))
    }

    fn address(&self, index: usize) -> Result<Address, RpcError> {
        Address::from_str(self.str(index, "address")?)
            .ok()
            .and_then(|a| a.require_network(Network::Regtest).ok())
            .ok_or_else(|| RpcError::new(RPC_INVALID_ADDRESS_OR_KEY, "Invalid regtest address"))
    }

    fn amount_btc(&self, index: usize) -> Result<Amount, RpcError> {
        let btc = self
            .required(index, "amount")?
            .as_f64()
            .ok_or_else(|| RpcError::new(RPC_TYPE_ERROR, "amount must be a number (BTC)"))?;
        Amount::from_btc(btc)
            .ok()
            .filter(|a| *a > Amount::ZERO && *a <= Amount::MAX_MONEY)
            .ok_or_else(|| RpcError::new(RPC_TYPE_ERROR, "Invalid amount"))
    }
}

fn find_block<'c>(chain: &'c Chain, hash: &BlockHash) -> Result<&'c StoredBlock, RpcError> {
    chain
        .block_by_hash(hash)
        .ok_or_else(|| RpcError::new(RPC_INVALID_ADDRESS_OR_KEY, "Block not found"))
}

/// Fee rate in sat/vB as bitcoind reports it: BTC per 1000 vbytes.
fn btc_per_kvb(sat_per_vb: u64) -> f64 {
    Amount::from_sat(sat_per_vb.saturating_mul(1_000)).to_btc()
}

fn blockchain_info(chain: &Chain) -> Value {
    let tip = chain.tip();
    json!({
        "chain": "regtest",
        "blocks": tip.height,
        "headers": tip.height,
        "bestblockhash": tip.hash.to_string(),
        "difficulty": tip.block.header.difficulty_float(),
        "time": tip.block.header.time,
        "mediantime": tip.median_time,
        "verificationprogress": 1.0,
        "initialblockdownload": false,
        "chainwork": tip.chainwork.to_be_bytes().to_lower_hex_string(),
        "size_on_disk": 0,
        "pruned": false,
        "warnings": "",
    })
}

/// `getblockheader` with verbose=true. lightning-block-sync reads version, merkleroot, time,
/// nonce, bits (8 hex digits), chainwork (64 hex digits), height and previousblockhash
/// (absent for the genesis block).
fn header_json(chain: &Chain, stored: &StoredBlock) -> Value {
    let header = &stored.block.header;
    let mut obj = Map::new();
    obj.insert("hash".into(), json!(stored.hash.to_string()));
    obj.insert("confirmations".into(), json!(chain.confirmations(stored.height)));
    obj.insert("height".into(), json!(stored.height));
    obj.insert("version".into(), json!(header.version.to_consensus()));
    obj.insert("versionHex".into(), json!(format!("{:08x}", header.version.to_consensus())));
    obj.insert("merkleroot".into(), json!(header.merkle_root.to_string()));
    obj.insert("time".into(), json!(header.time));
    obj.insert("mediantime".into(), json!(stored.median_time));
    obj.insert("nonce".into(), json!(header.nonce));
    obj.insert("bits".into(), json!(format!("{:08x}", header.bits.to_consensus())));
    obj.insert("difficulty".into(), json!(header.difficulty_float()));
    obj.insert("chainwork".into(), json!(stored.chainwork.to_be_bytes().to_lower_hex_string()));
    obj.insert("nTx".into(), json!(stored.block.txdata.len()));
    if stored.height > 0 {
        obj.insert("previousblockhash".into(), json!(header.prev_blockhash.to_string()));
    }
    if let Some(next) = chain.block_at(stored.height + 1) {
        obj.insert("nextblockhash".into(), json!(next.hash.to_string()));
    }
    Value::Object(obj)
}

/// `getblock` with verbosity 1: the header fields plus sizes and the txids.
fn block_json(chain: &Chain, stored: &StoredBlock) -> Value {
    let mut obj = header_json(chain, stored);
    if let Some(map) = obj.as_object_mut() {
        let block = &stored.block;
        let total_size = block.total_size() as u64;
        let weight_wu = block.weight().to_wu();
        // weight = 3 × stripped size + total size (BIP141).
        let stripped_size = (weight_wu - total_size) / 3;
        map.insert("size".into(), json!(total_size));
        map.insert("strippedsize".into(), json!(stripped_size));
        map.insert("weight".into(), json!(weight_wu));
        let txids: Vec<String> =
            block.txdata.iter().map(|tx| tx.compute_txid().to_string()).collect();
        map.insert("tx".into(), json!(txids));
    }
    obj
}

fn script_json(script: &ldk_node::bitcoin::Script) -> Value {
    let mut obj = json!({
        "asm": script.to_asm_string(),
        "hex": script.as_bytes().to_lower_hex_string(),
    });
    if let (Ok(address), Some(map)) =
        (Address::from_script(script, Network::Regtest), obj.as_object_mut())
    {
        map.insert("address".into(), json!(address.to_string()));
    }
    obj
}

/// `getmempoolentry`; ldk-node reads `time` (unix seconds) and `height`.
fn mempool_entry_json(chain: &Chain, txid: &Txid) -> Option<Value> {
    let entry = chain.mempool_entry(txid)?;
    let fee_btc = entry.fee.to_btc();
    let depends: Vec<String> = chain.mempool_parents(entry).iter().map(Txid::to_string).collect();
    Some(json!({
        "vsize": entry.tx.vsize(),
        "weight": entry.tx.weight().to_wu(),
        "time": entry.time_unix_secs,
        "height": entry.height,
        "fees": { "base": fee_btc, "modified": fee_btc, "ancestor": fee_btc, "descendant": fee_btc },
        "depends": depends,
        "bip125-replaceable": false,
        "unbroadcast": false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devchain::DevChainConfig;
    use ldk_node::bitcoin::block::Header;
    use ldk_node::bitcoin::hashes::Hash;
    use ldk_node::bitcoin::Block;

    const NOW: u64 = 1_700_000_000;

    fn call(shared: &Shared, method: &str, params: Value) -> Value {
        let body = json!({ "method": method, "params": params, "id": "7" }).to_string();
        handle_body(shared, body.as_bytes(), NOW)
    }

    fn result(shared: &Shared, method: &str, params: Value) -> Value {
        let answer = call(shared, method, params);
        assert!(answer["error"].is_null(), "{method}: {answer}");
        assert_eq!(answer["id"], "7");
        answer["result"].clone()
    }

    fn error_code(shared: &Shared, method: &str, params: Value) -> i64 {
        let answer = call(shared, method, params);
        assert!(answer["result"].is_null(), "{method}: {answer}");
        answer["error"]["code"].as_i64().unwrap()
    }

    fn regtest_address() -> String {
        let script = crate::devchain::chain::anyone_can_spend_script();
        Address::p2wsh(&script, Network::Regtest).to_string()
    }

    #[test]
    fn header_shapes_match_what_lightning_block_sync_parses() {
        let shared = Shared::new(&DevChainConfig::default());
        let genesis = result(&shared, "getblockhash", json!([0]));
        let header = result(&shared, "getblockheader", json!([genesis]));
        assert!(header.get("previousblockhash").is_none());
        assert_eq!(header["height"], 0);
        assert_eq!(header["bits"], "207fffff");
        assert_eq!(header["chainwork"].as_str().unwrap().len(), 64);

        let hashes = result(&shared, "generatetoaddress", json!([2, regtest_address()]));
        let tip = hashes[1].as_str().unwrap();
        let header = result(&shared, "getblockheader", json!([tip]));
        assert_eq!(header["height"], 2);
        assert_eq!(header["previousblockhash"], hashes[0]);
        assert_eq!(header["confirmations"], 1);
        let header_hex = result(&shared, "getblockheader", json!([tip, false]));
        let decoded: Header = deserialize_hex(header_hex.as_str().unwrap()).unwrap();
        assert_eq!(decoded.block_hash().to_string(), tip);
        let block_hex = result(&shared, "getblock", json!([tip, 0]));
        let block: Block = deserialize_hex(block_hex.as_str().unwrap()).unwrap();
        assert!(block.check_witness_commitment() && block.check_merkle_root());
        let verbose = result(&shared, "getblock", json!([tip]));
        assert_eq!(verbose["tx"].as_array().unwrap().len(), 1);

        let info = result(&shared, "getblockchaininfo", json!([]));
        assert_eq!(info["blocks"], 2);
        assert_eq!(info["bestblockhash"], tip);
        assert_eq!(info["chain"], "regtest");
        assert_eq!(error_code(&shared, "getblockhash", json!([3])), -8);
        assert_eq!(
            error_code(&shared, "getblock", json!([BlockHash::all_zeros().to_string(), 0])),
            -5
        );
    }

    #[test]
    fn faucet_mempool_and_txout_shapes() {
        let shared = Shared::new(&DevChainConfig::default());
        let txid = result(&shared, "sendtoaddress", json!([regtest_address(), 0.5]));
        let txid_str = txid.as_str().unwrap();
        assert_eq!(result(&shared, "getrawmempool", json!([false])), json!([txid_str]));
        let entry = result(&shared, "getmempoolentry", json!([txid_str]));
        assert_eq!(entry["time"], NOW);
        assert_eq!(entry["height"], 0);
        let raw = result(&shared, "getrawtransaction", json!([txid_str]));
        let tx: Transaction = deserialize_hex(raw.as_str().unwrap()).unwrap();
        assert_eq!(tx.compute_txid().to_string(), txid_str);

        let out = result(&shared, "gettxout", json!([txid_str, 0]));
        assert_eq!(out["confirmations"], 0);
        assert_eq!(out["value"], 0.5);
        assert_eq!(out["scriptPubKey"]["address"], regtest_address());
        assert!(result(&shared, "gettxout", json!([txid_str, 0, false])).is_null());

        result(&shared, "generatetoaddress", json!([1, regtest_address()]));
        assert_eq!(error_code(&shared, "getmempoolentry", json!([txid_str])), -5);
        assert_eq!(result(&shared, "gettxout", json!([txid_str, 0, false]))["confirmations"], 1);
        assert!(result(&shared, "gettxout", json!([txid_str, 1])).is_null());
        // Confirmed transactions stay findable, as with -txindex.
        assert_eq!(result(&shared, "getrawtransaction", json!([txid_str])), raw);
        // Resending a confirmed transaction: bitcoind's "already in chain".
        assert_eq!(error_code(&shared, "sendrawtransaction", json!([raw])), -27);
        assert_eq!(error_code(&shared, "sendrawtransaction", json!(["00"])), -22);
    }

    #[test]
    fn fee_answers_are_in_btc_per_kvb() {
        let shared = Shared::new(&DevChainConfig::default());
        let fee = result(&shared, "estimatesmartfee", json!([6, "CONSERVATIVE"]));
        assert_eq!(fee["feerate"], 0.00002);
        assert_eq!(fee["blocks"], 6);
        assert!(fee.get("errors").is_none());
        let info = result(&shared, "getmempoolinfo", json!([]));
        assert_eq!(info["mempoolminfee"], 0.00001);
        assert_eq!(info["size"], 0);
    }

    #[test]
    fn batches_unknown_methods_and_bad_requests() {
        let shared = Shared::new(&DevChainConfig::default());
        let batch = json!([
            { "method": "getblockcount", "params": [], "id": 1 },
            { "method": "nosuchmethod", "params": [], "id": 2 },
        ]);
        let answer = handle_body(&shared, batch.to_string().as_bytes(), NOW);
        assert_eq!(answer[0]["result"], 0);
        assert_eq!(answer[0]["id"], 1);
        assert_eq!(answer[1]["error"]["code"], RPC_METHOD_NOT_FOUND);
        assert_eq!(answer[1]["id"], 2);
        assert_eq!(handle_body(&shared, b"{not json", NOW)["error"]["code"], RPC_PARSE_ERROR);
        assert_eq!(error_code(&shared, "getblockhash", json!({ "height": 0 })), RPC_INVALID_PARAMS);
        assert_eq!(error_code(&shared, "getblockhash", json!([])), RPC_INVALID_PARAMS);
        assert_eq!(error_code(&shared, "getblockhash", json!(["x"])), RPC_TYPE_ERROR);
        let mainnet = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq";
        assert_eq!(error_code(&shared, "sendtoaddress", json!([mainnet, 1.0])), -5);
        assert_eq!(
            error_code(&shared, "sendtoaddress", json!([regtest_address(), 0])),
            RPC_TYPE_ERROR
        );
        let too_many = MAX_BLOCKS_PER_CALL + 1;
        assert_eq!(
            error_code(&shared, "generatetoaddress", json!([too_many, regtest_address()])),
            RPC_INVALID_PARAMETER
        );
    }
}
