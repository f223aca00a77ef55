# frozen_string_literal: true

require "spec_helper"
require "digest"
require "socket"
require "io/wait"

# Request buffering shields a process-based app server: a real 4-worker
# Unicorn behind `thrust` keeps answering while 50 clients upload slowly,
# because no upload reaches a worker before it is complete.
RSpec.describe "request buffering" do
  # Requests for /up answered within `seconds` by 4 keep-alive clients.
  def rate(port, seconds)
    deadline = monotonic + seconds
    Array.new(4) do
      Thread.new do
        answered = 0
        Net::HTTP.start("127.0.0.1", port, read_timeout: seconds + 5) do |http|
          answered += http.get("/up").code == "200" ? 1 : 0 while monotonic < deadline
        end
        answered
      end
    end.sum(&:value) / seconds.to_f
  end

  # Sends `body` in `pieces` pieces `gap` seconds apart; returns the response body.
  def slow_upload(port, body, pieces:, gap:, started: nil)
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write("POST /digest HTTP/1.1\r\nHost: x\r\nContent-Length: #{body.bytesize}\r\n" \
                 "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
    started&.push(true)
    body.bytes.each_slice((body.bytesize / pieces.to_f).ceil) do |slice|
      socket.write(slice.pack("C*"))
      sleep gap
    end
    socket.read.split("\r\n\r\n", 2).last
  ensure
    socket&.close
  end

  it "keeps a 4-worker Unicorn answering while 50 clients upload slowly, and every upload arrives whole" do
    _thrust, port = start_thrust_with_unicorn
    unloaded = rate(port, 2)
    bodies = Array.new(50) { |i| Random.new(i).bytes(3000) }
    started = Queue.new
    uploads = bodies.map { |body| Thread.new { slow_upload(port, body, pieces: 30, gap: 0.1, started:) } }
    50.times { started.pop }
    loaded = rate(port, 2)
    answers = uploads.map(&:value)
    expect(answers).to eq(bodies.map { |b| "#{b.bytesize} #{Digest::SHA256.hexdigest(b)}" })
    expect(loaded).to be >= unloaded / 2, "#{loaded.round} req/s under slow uploads vs #{unloaded.round} unloaded"
  end

  it "can be turned off, and then slow uploads do hold the workers" do
    _thrust, port = start_thrust_with_unicorn("REQUEST_BUFFERING" => "false", "WORKERS" => "1")
    started = Queue.new
    upload = Thread.new { slow_upload(port, "x" * 600, pieces: 20, gap: 0.1, started:) }
    started.pop
    sleep 0.2 # the upload's first pieces reach the only worker
    started = monotonic
    expect(http_get(port, "/up").code).to eq("200")
    expect(monotonic - started).to be > 0.5 # waited for the one worker to finish the upload
    expect(upload.value).to start_with("600 ")
  end

  it "cuts off a body slower than REQUEST_BODY_MIN_RATE with 408, and lets a slow but steady one through" do
    _thrust, port = start_thrust_with_unicorn("WORKERS" => "1")
    # 2 bytes a second against the 64 B/s floor, and 200 B/s: both for 12 s.
    trickle = Thread.new { trickle_until_answered(port, 24, gap: 0.5) }
    steady = Thread.new { slow_upload(port, "s" * 2400, pieces: 24, gap: 0.5) }
    expect(steady.value).to eq("2400 #{Digest::SHA256.hexdigest('s' * 2400)}")
    status, waited = trickle.value
    expect(status).to eq("408")
    expect(waited).to be_between(9, 13) # one 10 s window of waiting
  end

  # Sends one byte every `gap` until the proxy answers; returns the status
  # and the seconds it took.
  def trickle_until_answered(port, size, gap:)
    socket = TCPSocket.new("127.0.0.1", port)
    started = monotonic
    socket.write("POST /digest HTTP/1.1\r\nHost: x\r\nContent-Length: #{size}\r\nConnection: close\r\n\r\n")
    size.times do
      break if socket.wait_readable(gap)

      socket.write("t")
    end
    [socket.read[%r{\AHTTP/1\.1 (\d+)}, 1], monotonic - started]
  ensure
    socket&.close
  end
end

# Response buffering: the proxy reads the app's response as fast as the app
# sends it, so a client that reads slowly (or not at all) never holds the
# one Unicorn worker.
RSpec.describe "response buffering" do
  def start_thrust_with_one_unicorn_worker(env = {})
    start_thrust_with_unicorn({ "WORKERS" => "1" }.merge(env))
  end

  # A client that asks for `path` and then reads nothing, with a small
  # receive buffer so the kernel holds little for it.
  def stalled_reader(port, path)
    socket = Socket.new(:INET, :STREAM)
    socket.setsockopt(Socket::SOL_SOCKET, Socket::SO_RCVBUF, 4096)
    socket.connect(Socket.sockaddr_in(port, "127.0.0.1"))
    socket.write("GET #{path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n")
    socket
  end

  # /up's status, or nil if no answer came within `seconds`.
  def up_within(port, seconds)
    Net::HTTP.start("127.0.0.1", port, open_timeout: seconds, read_timeout: seconds) { |http| http.get("/up").code }
  rescue Net::ReadTimeout
    nil
  end

  def expected_digest(megabytes)
    digest = Digest::SHA256.new
    (megabytes * 16).times { |i| digest << (format("%015d\n", i) * 4096) }
    digest.hexdigest
  end

  it "answers other requests while a client reads a 48 MiB response slowly, which then arrives whole" do
    _thrust, port = start_thrust_with_one_unicorn_worker
    reader = stalled_reader(port, "/big?mb=48")
    sleep 0.5 # the worker starts writing the response
    expect(up_within(port, 10)).to eq("200")
    head, body = reader.read.split("\r\n\r\n", 2)
    expect(head).to start_with("HTTP/1.1 200")
    expect(body.bytesize).to eq(48 << 20)
    expect(Digest::SHA256.hexdigest(body)).to eq(expected_digest(48))
  ensure
    reader&.close
  end

  it "lets a slow reader hold the worker when the app says X-Accel-Buffering: no, and hides that header" do
    _thrust, port = start_thrust_with_one_unicorn_worker
    reader = stalled_reader(port, "/big?mb=48&accel=no")
    sleep 0.5
    expect(up_within(port, 3)).to be_nil
    head = reader.readpartial(4096)
    expect(head).to start_with("HTTP/1.1 200")
    expect(head.downcase).not_to include("x-accel-buffering")
    reader.close
    expect(up_within(port, 10)).to eq("200")
  ensure
    reader&.close unless reader&.closed?
  end

  it "lets a slow reader hold the worker when turned off (RESPONSE_BUFFERING=false)" do
    _thrust, port = start_thrust_with_one_unicorn_worker("RESPONSE_BUFFERING" => "false")
    reader = stalled_reader(port, "/big?mb=48")
    sleep 0.5
    expect(up_within(port, 3)).to be_nil
  ensure
    reader&.close
  end

  it "still passes a streamed response on as the app sends it" do
    _thrust, port = start_thrust_with_puma
    socket = TCPSocket.new("127.0.0.1", port)
    started = monotonic
    socket.write("GET /sse?n=3&gap=1&type=text/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first = socket.readpartial(4096)
    first += socket.readpartial(4096) until first.include?("event 0")
    first_at = monotonic - started
    rest = socket.read
    expect(first + rest).to include("event 2")
    expect(first_at).to be < (monotonic - started) - 1.0 # the first event came well before the end
  ensure
    socket&.close
  end
end
