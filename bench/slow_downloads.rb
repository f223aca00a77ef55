# frozen_string_literal: true

# Memory under slow X-Sendfile downloads: CLIENTS clients fetch a SIZE_MIB file
# through `thrust` (the app answers with X-Sendfile) and read it slowly
# (READ_KIB every 100 ms) for SECONDS. thrust's RSS is sampled every second;
# the report is the growth over idle, per client. Cleartext HTTP/1.1, so the
# bodies go out with sendfile(2).
#
#   ruby bench/slow_downloads.rb                  # 50 clients, 1 GiB file, 20 s
#   CLIENTS=10 SIZE_MIB=256 ruby bench/slow_downloads.rb

require "net/http"
require "socket"
require "tmpdir"
require "rbconfig"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
THRUST = File.join(ROOT, "lib", "thruster", "thrust")
CLIENTS = Integer(ENV.fetch("CLIENTS", "50"))
SIZE_MIB = Integer(ENV.fetch("SIZE_MIB", "1024"))
SECONDS = Integer(ENV.fetch("SECONDS", "20"))
READ_KIB = Integer(ENV.fetch("READ_KIB", "64"))

abort "bench/slow_downloads: #{THRUST} missing; run `bundle exec rake compile`" unless File.executable?(THRUST)

def rss_kib(pid) = BenchSupport.sum_kib([pid], "status", "VmRSS")

# Starts thrust (with Puma answering X-Sendfile for `big`); returns [pid, port].
def start_thrust(dir, big)
  app = File.join(dir, "app.ru")
  File.write(app, "run ->(_env) { [200, { \"x-sendfile\" => #{big.inspect}, \"content-length\" => \"0\" }, []] }\n")
  port = BenchSupport.free_port
  target = BenchSupport.free_port
  env = { "HTTP_PORT" => port.to_s, "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false",
          "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "STORAGE_PATH" => File.join(dir, "storage") }
  pid = Process.spawn(env, THRUST, RbConfig.ruby, Gem.bin_path("puma", "puma"), "-q", "-b",
                      "tcp://127.0.0.1:#{target}", app, out: File::NULL, err: File::NULL, pgroup: true)
  BenchSupport.wait_for(port, path: "/", what: "thrust")
  [pid, port]
end

# Slow readers for SECONDS; returns [RSS samples (KiB), bytes received per client].
def slow_clients(pid, port)
  sockets = Array.new(CLIENTS) do
    TCPSocket.new("127.0.0.1", port).tap { |s| s.write("GET /file HTTP/1.1\r\nHost: bench\r\n\r\n") }
  end
  samples = []
  received = Array.new(CLIENTS, 0)
  finish = Time.now + SECONDS
  next_sample = Time.now
  while Time.now < finish
    sockets.each_with_index do |s, i|
      data = s.read_nonblock(READ_KIB * 1024, exception: false)
      received[i] += data.bytesize if data.is_a?(String)
    end
    (samples << rss_kib(pid)) && (next_sample += 1) if Time.now >= next_sample
    sleep 0.1
  end
  sockets.each(&:close)
  [samples, received]
end

Dir.mktmpdir("thruster-slow") do |dir|
  big = File.join(dir, "big.bin")
  # Sparse: no disk needed, and the page cache serves zeros as fast as data.
  File.open(big, "wb") { |f| f.truncate(SIZE_MIB << 20) }
  pid, port = start_thrust(dir, big)
  begin
    idle = rss_kib(pid)
    samples, received = slow_clients(pid, port)
    peak = samples.max
    per_client = ((peak - idle).to_f / CLIENTS).round
    puts "| clients | file | read rate per client | idle RSS MiB | peak RSS MiB | growth MiB | per client KiB |"
    puts "|---|---|---|---|---|---|---|"
    puts "| #{CLIENTS} | #{SIZE_MIB} MiB | #{READ_KIB} KiB/100 ms | #{(idle / 1024.0).round(1)} | " \
         "#{(peak / 1024.0).round(1)} | #{((peak - idle) / 1024.0).round(1)} | #{per_client} |"
    puts "RSS samples (MiB, 1 s apart): #{samples.map { |k| (k / 1024.0).round(1) }.join(' ')}"
    puts "received per client (MiB, median): #{(received.sort[CLIENTS / 2] / (1024.0 * 1024)).round(1)}"
  ensure
    Process.kill("TERM", -pid)
    Process.wait(pid)
  end
end
