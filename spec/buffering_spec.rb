# frozen_string_literal: true

require "spec_helper"
require "digest"
require "socket"

# Request buffering shields a process-based app server: a real 4-worker
# Unicorn behind `thrust` keeps answering while 50 clients upload slowly,
# because no upload reaches a worker before it is complete.
RSpec.describe "request buffering" do
  def start_thrust_with_unicorn(env = {})
    target = free_port
    thrust = ChildProcess.start(
      # Unicorn is not in the Gemfile: run it outside Bundler, like Debian installs it.
      { "HTTP_PORT" => "0", "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false",
        "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }.merge(env),
      thrust_path, "unicorn", "-c", File.join(FIXTURES, "unicorn.rb"), File.join(FIXTURES, "app.ru")
    )
    port = thrust.http_port
    wait_for_ok(port, timeout: 30, message: "Unicorn behind thrust")
    [thrust, port]
  end

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
end
