# frozen_string_literal: true

require "spec_helper"
require "English"
require "digest"
require "fileutils"
require "net/http"
require "tmpdir"
require "uri"
require "zlib"

# The disk cache tier through `thrust`, against a real Puma: what survives a
# restart, what a damaged or unwritable directory does, the budget, and two
# proxies on one directory. Each example owns its STORAGE_PATH and shares it
# only between the proxies it starts itself.
RSpec.describe "disk cache tier" do
  def public_cc = "cc=public,+max-age%3D600"

  # A fixed Host: a restarted proxy listens on another port, and the host
  # (port included) is part of the cache key.
  def get(port, path, headers = {}, method: Net::HTTP::Get)
    identity_request(port, path, headers: { "Host" => "disk.test" }.merge(headers), method:)
  end

  def hits(port, path)
    Integer(identity_request(port, "/hits?path=#{URI.encode_www_form_component(path)}").body)
  end

  # The fixture's body for a path (see Cacheable.body_for in app.ru).
  def css(path, size: 4000, accept: "*/*", tag: nil)
    text = "/* #{path} #{accept}#{" #{tag}" if tag} */\n"
    (text + ("body { color: red; }\n" * ((size / 21) + 1))).byteslice(0, size)
  end

  def start(storage, env = {})
    start_thrust_with_puma(env: { "STORAGE_PATH" => storage, "LOG_REQUESTS" => "false" }.merge(env))
  end

  # SIGTERM, as a deploy or `docker stop` sends it: pending writes are flushed.
  def stop(thrust)
    thrust.signal("TERM")
    thrust.wait(timeout: 30)
  end

  # The records of the disk tier (entries, vary records, encodings) with
  # their inode and size: a record written again is another inode.
  def entry_files(storage)
    files = Dir.glob(File.join(storage, "cache", "[0-9a-f][0-9a-f]", "[0-9a-f][0-9a-f]", "*"))
    files.each_with_object({}) do |f, out|
      stat = File.stat(f)
      out[f] = [stat.ino, stat.size]
    rescue Errno::ENOENT # evicted meanwhile
      nil
    end
  end

  # Bytes the records take, in 4 KiB blocks (as CACHE_DISK_SIZE counts).
  def disk_bytes(storage)
    entry_files(storage).values.sum { |_, size| (size + 4095) / 4096 * 4096 }
  end

  def flip_byte(file, at)
    File.open(file, "r+b") do |f|
      f.seek(at)
      byte = f.read(1).ord
      f.seek(at)
      f.write((byte ^ 0x5a).chr)
    end
  end

  around do |example|
    Dir.mktmpdir("thruster-disk-cache") do |dir|
      @storage = dir
      example.run
    end
  end

  it "answers the first request after a restart from disk without the app: identity, gzip and Vary variants, " \
     "nothing compressed again" do
    plain = "/cache/r.css?#{public_cc}&size=20000"
    varied = "/cache/rv.css?#{public_cc}&vary=Accept"
    thrust, port = start(@storage)
    first = get(port, plain)
    expect(first["x-cache"]).to eq("miss")
    gzip = get(port, plain, { "Accept-Encoding" => "gzip" })
    expect([gzip["x-cache"], gzip["content-encoding"]]).to eq(%w[hit gzip])
    html = get(port, varied, { "Accept" => "text/html" })
    json = get(port, varied, { "Accept" => "application/json" })
    expect([html["x-cache"], json["x-cache"]]).to eq(%w[miss miss])
    stop(thrust)
    # r.css: its entry, its vary record, its gzip encoding; rv.css: two
    # variants and a vary record.
    before = entry_files(@storage)
    expect(before.size).to eq(6)

    thrust, port = start(@storage)
    again = get(port, plain)
    expect(again["x-cache"]).to eq("hit")
    expect(again.body).to eq(first.body)
    expect(again.body).to eq(css("/cache/r.css", size: 20_000))
    gzip_again = get(port, plain, { "Accept-Encoding" => "gzip" })
    expect([gzip_again["x-cache"], gzip_again["content-encoding"]]).to eq(%w[hit gzip])
    expect(gzip_again.body.b).to eq(gzip.body.b)
    expect(Zlib.gunzip(gzip_again.body)).to eq(first.body)
    # A fresh process has no Vary rule yet: the vary record on disk leads
    # each client to its own variant.
    json_again = get(port, varied, { "Accept" => "application/json" })
    html_again = get(port, varied, { "Accept" => "text/html" })
    expect([json_again["x-cache"], html_again["x-cache"]]).to eq(%w[hit hit])
    expect(json_again.body).to eq(json.body)
    expect(json_again.body).to include("application/json")
    expect(html_again.body).to eq(html.body)
    expect(html_again.body).to include("text/html")
    expect([hits(port, "/cache/r.css"), hits(port, "/cache/rv.css")]).to eq([0, 0])
    stop(thrust)
    # Nothing was written again: the gzip body came from its file, not from
    # compressing anew.
    expect(entry_files(@storage)).to eq(before)
  end

  it "keeps Age right across a restart: the time before it counts" do
    path = "/cache/age.css?#{public_cc}"
    thrust, port = start(@storage)
    first = get(port, path)
    expect(first["x-cache"]).to eq("miss")
    stop(thrust)
    sleep 2
    _thrust, port = start(@storage)
    again = get(port, path)
    expect(again["x-cache"]).to eq("hit")
    expect(again["date"]).to eq(first["date"])
    expect(Integer(again["age"])).to be_between(2, 60)
    expect(hits(port, "/cache/age.css")).to eq(0)
  end

  it "answers at least 90% of 200 cached URLs from disk on the first request after a restart" do
    paths = Array.new(200) { |i| "/cache/many-#{i}.css?#{public_cc}&size=#{2000 + (i * 37)}" }
    thrust, port = start(@storage)
    paths.each { |path| expect(get(port, path)["x-cache"]).to eq("miss") }
    stop(thrust)
    _thrust, port = start(@storage)
    labels = paths.map do |path|
      response = get(port, path)
      expect(response.code).to eq("200")
      expect(response.body).to eq(css(URI(path).path, size: Integer(path[/size=(\d+)/, 1])))
      response["x-cache"]
    end
    expect(labels.count("hit")).to be >= 180
  end

  it "treats corrupted or truncated entry files as misses: correct 200s from the app, never a 5xx" do
    # Sizes from one chunk to several (256 KiB each).
    paths = Array.new(12) { |i| "/cache/bad-#{i}.css?#{public_cc}&size=#{[3000, 300_000, 700_000][i % 3] + i}" }
    thrust, port = start(@storage)
    paths.each do |path|
      get(port, path)
      get(port, path, { "Accept-Encoding" => "gzip" })
    end
    stop(thrust)
    files = entry_files(@storage).keys
    expect(files.size).to eq(36) # entry, vary record, gzip encoding each
    files.each_with_index do |file, i|
      size = File.size(file)
      case i % 4
      when 0 then File.truncate(file, size / 2)                # torn write
      when 1 then flip_byte(file, size / 2)                    # bad sector mid-file
      when 2 then flip_byte(file, size - 1)                    # last chunk
      else File.binwrite(file, "\0" * 16, 0)                   # blocks that never reached the disk
      end
    end
    damaged = files.to_h { |file| [file, Digest::SHA256.file(file).hexdigest] }

    thrust, port = start(@storage)
    paths.each do |path|
      expected = css(URI(path).path, size: Integer(path[/size=(\d+)/, 1]))
      identity = get(port, path)
      expect([identity.code, identity["x-cache"]]).to eq(%w[200 miss]), path
      expect(identity.body).to eq(expected)
      gzip = get(port, path, { "Accept-Encoding" => "gzip" })
      expect(gzip.code).to eq("200")
      expect(Zlib.gunzip(gzip.body)).to eq(expected)
      expect(hits(port, URI(path).path)).to eq(1)
    end
    stop(thrust)
    # Every damaged file was removed or replaced by a good one.
    left = damaged.select { |file, digest| File.exist?(file) && Digest::SHA256.file(file).hexdigest == digest }
    expect(left).to be_empty
  end

  it "keeps the directory under CACHE_DISK_SIZE under churn, evicting expired entries before older fresh ones" do
    budget = 256 * 1024 # about 10 resources of 24 KiB (entry and vary record)
    thrust, port = start(@storage, "CACHE_DISK_SIZE" => budget.to_s)
    fresh = ->(i) { "/cache/churn-#{i}.css?#{public_cc}&size=20000" }
    short = ->(i) { "/cache/short-#{i}.css?cc=public,+max-age%3D1&size=20000" }
    # The files holding a resource's entry or vary record (the key is in them).
    on_disk = ->(path) { entry_files(@storage).keys.select { |f| File.binread(f, 512).include?(URI(path).path) } }
    settle = -> { wait_until(timeout: 10, message: "eviction under the budget") { disk_bytes(@storage) <= budget } }
    peak = 0
    churn = lambda do |paths|
      paths.each do |path|
        expect(get(port, path).code).to eq("200")
        peak = [peak, disk_bytes(@storage)].max
      end
    end
    churn.call(Array.new(40) { |i| fresh.call(i) })
    settle.call
    # The three most recent resources expire at once; then more churn.
    churn.call(Array.new(3) { |i| short.call(i) })
    settle.call
    sleep 1.5
    churn.call(Array.new(5) { |i| fresh.call(40 + i) })
    settle.call
    # Expired entries went first, though used more recently than the fresh
    # ones written before them, which are still there.
    expect(Array.new(3) { |i| on_disk.call(short.call(i)) }.flatten).to be_empty
    expect(on_disk.call(fresh.call(39)).size).to eq(2)
    # Full, not empty: 48 resources (1.1 MB) went through a 256 KiB budget.
    expect(disk_bytes(@storage)).to be >= budget / 2
    expect(peak).to be <= budget * 2
    stop(thrust)
    _thrust, port = start(@storage, "CACHE_DISK_SIZE" => budget.to_s)
    expect(get(port, fresh.call(44))["x-cache"]).to eq("hit")
  end

  it "shares one directory between two proxies writing the same keys at once: each answer is one app's " \
     "complete body, and both end up serving the same file" do
    a, port_a = start(@storage, "APP_TAG" => "A")
    b, port_b = start(@storage, "APP_TAG" => "B")
    [2_500_000, 300_000, 2_500_000, 700_000, 2_500_000].each_with_index do |size, round|
      path = "/cache/shared-#{round}.css?#{public_cc}&size=#{size}"
      bodies = %w[A B].to_h { |tag| [Digest::SHA256.hexdigest(css(URI(path).path, size:, tag:)), tag] }
      responses = Queue.new
      threads = [port_a, port_b].flat_map do |port|
        Array.new(3) { Thread.new { 3.times { responses << get(port, path) } } }
      end
      threads.each(&:join)
      until responses.empty?
        response = responses.pop
        expect(response.code).to eq("200")
        expect(bodies).to include(Digest::SHA256.hexdigest(response.body)), "round #{round}: a torn or mixed body"
      end
      next if size < 1024 * 1024

      # Too large for memory: every hit reads the one file on disk, which
      # ever process renamed it last.
      wait_until(timeout: 10, message: "both proxies serving the file on disk") do
        [port_a, port_b].map { |port| Digest::SHA256.hexdigest(get(port, path).body) }.uniq.size == 1
      end
    end
    [a, b].each { |proxy| stop(proxy) }
  end

  it "goes on memory-only after one warning when CACHE_DISK_PATH cannot be written" do
    # A path under a regular file fails with ENOTDIR, even for root.
    blocker = File.join(@storage, "a-file")
    File.write(blocker, "")
    thrust, port = start(@storage, "CACHE_DISK_PATH" => File.join(blocker, "cache"))
    5.times do |i|
      path = "/cache/ro-#{i}.css?#{public_cc}"
      expect(get(port, path)["x-cache"]).to eq("miss")
      again = get(port, path)
      expect([again.code, again["x-cache"]]).to eq(%w[200 hit])
      expect(again.body).to eq(css("/cache/ro-#{i}.css"))
    end
    warnings = thrust.log_lines.select { |line| line["level"] == "WARN" }
    expect(warnings.size).to eq(1), thrust.output
    expect(warnings.first["msg"]).to include("Disk cache cannot write")
    expect(warnings.first["error"]).to match(/not a directory/i)
  end

  it "writes to disk by default, and nothing with CACHE_DISK_PATH=none or CACHE_SIZE=0" do
    path = "/cache/off.css?#{public_cc}"
    {
      {} => 2, # the entry and its vary record
      { "CACHE_DISK_PATH" => "none" } => 0,
      { "CACHE_SIZE" => "0" } => 0
    }.each do |env, files|
      storage = Dir.mktmpdir("thruster-disk-off", @storage)
      thrust, port = start(storage, env)
      2.times { expect(get(port, path).code).to eq("200") }
      stop(thrust)
      expect(entry_files(storage).size).to eq(files), env.inspect
      expect(Dir.exist?(File.join(storage, "cache"))).to be(false), env.inspect if files.zero?
    end
  end

  it "keeps a body too large for memory on disk and streams it from there; a damaged chunk cuts the response" do
    size = 5 * 1024 * 1024 # over MAX_CACHE_ITEM_SIZE (1 MiB)
    path = "/cache/large.css?#{public_cc}&size=#{size}"
    thrust, port = start(@storage)
    first = get(port, path)
    expect([first["x-cache"], first.body.bytesize]).to eq(["miss", size])
    second = get(port, path)
    expect(second["x-cache"]).to eq("hit")
    expect(second.body).to eq(first.body)
    expect(hits(port, "/cache/large.css")).to eq(1)
    not_modified = get(port, path, { "If-None-Match" => first["etag"] })
    expect([not_modified.code, not_modified["x-cache"]]).to eq(%w[304 hit])
    head = get(port, path, method: Net::HTTP::Head)
    expect([head.code, head["content-length"], head["x-cache"]]).to eq(["200", size.to_s, "hit"])
    expect(hits(port, "/cache/large.css")).to eq(1)
    # Ranges are answered from the file too, reading only the chunks they
    # need (one across a chunk boundary, one at the very end).
    ranged = get(port, path, { "Range" => "bytes=262140-262149" })
    expect([ranged.code, ranged["x-cache"]]).to eq(%w[206 hit])
    expect(ranged["content-range"]).to eq("bytes 262140-262149/#{size}")
    expect(ranged.body).to eq(first.body.byteslice(262_140, 10))
    tail = get(port, path, { "Range" => "bytes=-7" })
    expect([tail.code, tail.body]).to eq(["206", first.body.byteslice(size - 7, 7)])
    # Several ranges: the whole body (each part would read the file again).
    several = get(port, path, { "Range" => "bytes=0-1,5-6" })
    expect([several.code, several.body.bytesize]).to eq(["200", size])
    expect(hits(port, "/cache/large.css")).to eq(1)

    # A client taking gzip: compressed on the way out on the first hit
    # (chunked), while the encoding is made once in the background and
    # stored; later hits stream the stored encoding (with its length).
    gzip = get(port, path, { "Accept-Encoding" => "gzip" })
    expect([gzip["x-cache"], gzip["content-encoding"]]).to eq(%w[hit gzip])
    expect(Zlib.gunzip(gzip.body)).to eq(first.body)
    stored = wait_until(message: "the stored gzip encoding") do
      again = get(port, path, { "Accept-Encoding" => "gzip" })
      again if again["content-length"]
    end
    expect([stored["x-cache"], stored["content-encoding"]]).to eq(%w[hit gzip])
    expect(Integer(stored["content-length"])).to eq(stored.body.bytesize)
    expect(Zlib.gunzip(stored.body)).to eq(first.body)
    expect(hits(port, "/cache/large.css")).to eq(1)

    # Damage the last chunk: the response ends as an error, never as a
    # complete wrong body, and the entry is removed.
    file, = entry_files(@storage).max_by { |_, (_, bytes)| bytes }
    flip_byte(file, File.size(file) - 100)
    url = "http://127.0.0.1:#{port}#{path}"
    out = IO.popen(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "-H", "Host: disk.test",
                    "-H", "Accept-Encoding: identity", url], &:read)
    expect($CHILD_STATUS.success?).to be(false)
    expect(Integer(out)).to be < size
    wait_until(message: "the damaged entry removed") { !File.exist?(file) }
    fresh = get(port, path)
    expect([fresh.code, fresh["x-cache"], fresh.body == first.body]).to eq(["200", "miss", true])
    expect(hits(port, "/cache/large.css")).to eq(2)

    # And it survives a restart like any entry.
    stop(thrust)
    _thrust, port = start(@storage)
    after = get(port, path)
    expect([after["x-cache"], after.body == first.body]).to eq(["hit", true])
    expect(hits(port, "/cache/large.css")).to eq(0)
  end

  it "serves an expired entry from disk in place of an app error within stale-if-error, after a restart" do
    # max-age=1 with a 60 s stale-if-error window; then the app fails.
    path = "/cache/flaky.css?cc=public,+max-age%3D1,+stale-if-error%3D60"
    strict = "/cache/flaky.css?cc=public,+max-age%3D1,+must-revalidate"
    thrust, port = start(@storage)
    stored_at = monotonic
    first = get(port, path)
    expect([first["x-cache"], get(port, strict)["x-cache"]]).to eq(%w[miss miss])
    stop(thrust)
    # The next process has nothing in memory, and its app answers 503 for
    # that path. Its first request for the entry must come after the entry
    # expired (a fresh one would be promoted into memory and go stale
    # there): waiting for the clock, not for the proxy.
    _thrust, port = start(@storage, "CACHE_FAIL_PATHS" => "/cache/flaky.css")
    sleep([stored_at + 2.5 - monotonic, 0].max)
    stale = get(port, path)
    expect([stale.code, stale["x-cache"], stale.body]).to eq(["200", "stale", first.body])
    # must-revalidate forbids it: the error goes through.
    expect(get(port, strict).code).to eq("503")
  end

  it "keeps X-Sendfile responses as references to their file across a restart, re-checked on a hit" do
    Dir.mktmpdir("thruster-disk-sendfile") do |dir|
      file = File.join(File.realpath(dir), "report.txt")
      File.write(file, "version one\n" * 100)
      path = "/sendfile?path=#{URI.encode_www_form_component(file)}&cc=public,+max-age%3D600"
      thrust, port = start(@storage)
      expect(get(port, path)["x-cache"]).to eq("miss")
      stop(thrust)
      # The entry holds the reference, not the file's bytes.
      expect(entry_files(@storage).values.map(&:last).max).to be < 4096

      _thrust, port = start(@storage)
      hit = get(port, path)
      expect([hit["x-cache"], hit.body]).to eq(["hit", "version one\n" * 100])
      expect(hits(port, "/sendfile")).to eq(0)
      File.write(file, "version two, longer\n" * 100)
      changed = get(port, path)
      expect([changed["x-cache"], changed.body]).to eq(["miss", "version two, longer\n" * 100])
      expect(hits(port, "/sendfile")).to eq(1)
    end
  end
end
