//! The NBD server: any bytes from a client, through the handshake and the
//! transmission phase, against an in-memory export.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use tessera_agent::device::{Device, ExportError, Exports};
use tessera_agent::nbd::{serve_connection, Limits, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Memory(Mutex<Vec<u8>>);

impl Device for Memory {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn writable(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> Vec<(u64, bool)> {
        vec![(len, false)]
    }
}

struct One(Arc<Memory>);

impl Exports for One {
    fn names(&self) -> Vec<String> {
        vec!["disk".into()]
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Device>, ExportError> {
        if name == "disk" {
            Ok(self.0.clone())
        } else {
            Err(ExportError::Image(tessera_store::Error::NoSuchImage(name.into())))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let exports = Arc::new(One(Arc::new(Memory(Mutex::new(vec![0u8; 1 << 20])))));
        let limits = Limits { client_timeout: std::time::Duration::from_secs(2), ..Limits::default() };
        let nbd = Arc::new(Server::new(exports, limits));
        let place = nbd.admit("fuzz").expect("room for one client");
        let task = tokio::spawn(serve_connection(server, nbd, place, "fuzz".into(), None));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
        let _ = task.await;
    });
});
