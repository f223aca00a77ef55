//! A response body read from an open file: whole, one range, or the pieces
//! of a multipart/byteranges answer. Reads are positioned (`pread`) on the
//! blocking pool in large chunks, one chunk in flight per response, so a
//! slow client holds at most a chunk or two of memory, whatever the file
//! size, and the runtime threads never block on the disk.

use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

use crate::conn::{ConnState, FileRegion, MARKER_LEN};
use crate::sys::OwnedFile;

/// Big enough that per-chunk overhead (a blocking-pool hop, a frame, a
/// write) is noise next to the copy; small enough to keep memory flat.
pub const CHUNK: u64 = 512 * 1024;

/// One piece of a file response.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Bytes made here (multipart part heads and the closing boundary).
    Bytes(Bytes),
    /// `len` bytes of the file from `start`.
    File { start: u64, len: u64 },
}

type Read = JoinHandle<std::io::Result<Bytes>>;

pub struct FileBody {
    file: Arc<OwnedFile>,
    pieces: std::collections::VecDeque<Piece>,
    pending: Option<Read>,
    remaining: u64,
    /// The client connection, when the body goes to a cleartext HTTP/1.1
    /// socket untouched (no compression): file regions then go out with
    /// sendfile(2) and never pass through user space.
    zero_copy: Option<Arc<ConnState>>,
}

impl FileBody {
    pub fn new(file: OwnedFile, pieces: Vec<Piece>) -> FileBody {
        let remaining = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len() as u64,
                Piece::File { len, .. } => *len,
            })
            .sum();
        FileBody {
            file: Arc::new(file),
            pieces: pieces.into(),
            pending: None,
            remaining,
            zero_copy: None,
        }
    }

    /// Sends file regions with sendfile(2) on this connection.
    pub fn zero_copy(mut self, conn: Arc<ConnState>) -> FileBody {
        self.zero_copy = Some(conn);
        self
    }

    /// The whole file.
    pub fn whole(file: OwnedFile, len: u64) -> FileBody {
        FileBody::new(file, vec![Piece::File { start: 0, len }])
    }
}

fn read_at(file: Arc<OwnedFile>, start: u64, len: u64) -> Read {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], start + filled as u64) {
                // The file shrank under us: the length we announced can no
                // longer be met, so the response must end in an error.
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while it was being sent",
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(buf))
    })
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            if let Some(pending) = self.pending.as_mut() {
                let read = std::task::ready!(Pin::new(pending).poll(cx));
                self.pending = None;
                return Poll::Ready(Some(match read {
                    Ok(Ok(bytes)) => {
                        self.remaining -= bytes.len() as u64;
                        Ok(Frame::data(bytes))
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(join) => Err(join.into()),
                }));
            }
            match self.pieces.pop_front() {
                None => return Poll::Ready(None),
                Some(Piece::Bytes(bytes)) => {
                    self.remaining -= bytes.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Some(Piece::File { len: 0, .. }) => continue,
                Some(Piece::File { start, len }) => {
                    if let Some(conn) = &self.zero_copy {
                        let now = len.min(MARKER_LEN as u64);
                        let frame = conn.queue_file_region(FileRegion {
                            file: Arc::clone(&self.file),
                            offset: start,
                            len: now,
                        });
                        if len > now {
                            self.pieces.push_front(Piece::File {
                                start: start + now,
                                len: len - now,
                            });
                        }
                        self.remaining -= now;
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                    let now = len.min(CHUNK);
                    if len > now {
                        self.pieces.push_front(Piece::File {
                            start: start + now,
                            len: len - now,
                        });
                    }
                    self.pending = Some(read_at(Arc::clone(&self.file), start, now));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    #[tokio::test]
    async fn reads_whole_files_and_pieces_in_order() {
        let path = std::env::temp_dir().join(format!("thruster-body-{}", std::process::id()));
        let data: Vec<u8> = (0..(CHUNK as usize * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();

        let body = FileBody::whole(crate::sys::open_read(&path, 0).unwrap(), data.len() as u64);
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &data[..]);

        let pieces = vec![
            Piece::Bytes(Bytes::from_static(b"<")),
            Piece::File { start: 10, len: 5 },
            Piece::Bytes(Bytes::from_static(b">")),
            Piece::File {
                start: CHUNK - 2,
                len: 4,
            },
        ];
        let got = FileBody::new(crate::sys::open_read(&path, 0).unwrap(), pieces)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let mut expected = b"<".to_vec();
        expected.extend_from_slice(&data[10..15]);
        expected.push(b'>');
        expected.extend_from_slice(&data[CHUNK as usize - 2..CHUNK as usize + 2]);
        assert_eq!(&got[..], &expected[..]);

        // A file cut short after the length was announced ends in an error.
        let body = FileBody::whole(
            crate::sys::open_read(&path, 0).unwrap(),
            data.len() as u64 + 10,
        );
        assert!(body.collect().await.is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
