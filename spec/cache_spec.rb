# frozen_string_literal: true

require "spec_helper"
require "net/http"
require "uri"

# The HTTP cache through `thrust`, against a real Puma. The fixture app's
# /cache/* resources take their caching headers from the query and count
# how often the app is asked for each path (/hits?path=...).
RSpec.describe "cache" do
  # Asks for identity unless told otherwise (Net::HTTP would ask for gzip
  # and decode it silently).
  def hits(port, path)
    Integer(identity_request(port, "/hits?path=#{URI.encode_www_form_component(path)}").body)
  end

  # [headers, body] as curl received them, decoding the body's coding.
  def curl(port, path, accept:)
    out = IO.popen(["curl", "-s", "--compressed", "-H", "Accept-Encoding: #{accept}", "-D", "-",
                    "http://127.0.0.1:#{port}#{path}"], &:read).b
    head, body = out.split("\r\n\r\n", 2)
    [head.lines.drop(1).to_h { |l| l.chomp.split(": ", 2).then { |k, v| [k.downcase, v] } }, body]
  end

  # The fixture's body for `path`, as asked with Net::HTTP's and curl's `Accept: */*`.
  def css(path, size = 4000)
    text = "/* #{path} */* */\n" + ("body { color: red; }\n" * ((size / 21) + 1))
    text.byteslice(0, size)
  end

  public_cc = "cc=public,+max-age%3D60"

  it "stores a public response once: miss, then hits that never reach the app" do
    _thrust, port = start_thrust_with_puma
    first = identity_request(port, "/cache/a.css?#{public_cc}")
    expect(first["x-cache"]).to eq("miss")
    expect(first.body).to eq(css("/cache/a.css"))
    3.times do
      again = identity_request(port, "/cache/a.css?#{public_cc}")
      expect(again["x-cache"]).to eq("hit")
      expect(again.body).to eq(first.body)
      expect(again["date"]).to eq(first["date"])
      expect(Integer(again["age"])).to be_between(0, 5)
    end
    expect(hits(port, "/cache/a.css")).to eq(1)
    head = identity_request(port, "/cache/a.css?#{public_cc}", method: Net::HTTP::Head)
    expect(head["x-cache"]).to eq("hit")
    expect(head["content-length"]).to eq(first.body.bytesize.to_s)
    expect(hits(port, "/cache/a.css")).to eq(1)
    # The query is part of the key; POST bypasses.
    expect(identity_request(port, "/cache/a.css?#{public_cc}&v=2")["x-cache"]).to eq("miss")
    expect(identity_request(port, "/cache/a.css?#{public_cc}", method: Net::HTTP::Post)["x-cache"]).to eq("bypass")
  end

  it "never stores what a shared cache must not, and keeps Set-Cookie" do
    _thrust, port = start_thrust_with_puma
    cases = {
      "no-public" => "cc=max-age%3D60",
      "no-store" => "cc=public,+max-age%3D60,+no-store",
      "private" => "cc=public,+max-age%3D60,+private",
      "no-cache" => "cc=public,+max-age%3D60,+no-cache",
      "zero" => "cc=public,+max-age%3D0",
      "vary-star" => "#{public_cc}&vary=*",
      "not-found" => "#{public_cc}&status=404",
      "cookie" => "#{public_cc}&cookie=session%3Dabc",
      "misspelt" => "cc=public,+s-max-age%3D60"
    }
    cases.each do |name, query|
      path = "/cache/never-#{name}.css"
      2.times do
        response = identity_request(port, "#{path}?#{query}")
        expect(response["x-cache"]).to eq("miss"), name
        expect(response["set-cookie"]).to eq("session=abc") if name == "cookie"
      end
      expect(hits(port, path)).to eq(2), name
    end
  end

  it "stores responses with an empty body: Content-Length 0, 204 and redirects" do
    _thrust, port = start_thrust_with_puma
    cases = {
      "/cache/empty.css" => ["200", "size=0&#{public_cc}"],
      "/cache/no-content" => ["204", "status=204&size=0&#{public_cc}"],
      "/cache/moved" => ["301", "status=301&size=0&location=%2Fcache%2Fnew&#{public_cc}"],
      "/cache/found" => ["302", "status=302&size=0&location=%2Fcache%2Fnew&#{public_cc}"]
    }
    cases.each do |path, (code, query)|
      first = identity_request(port, "#{path}?#{query}")
      expect([first.code, first["x-cache"]]).to eq([code, "miss"]), path
      2.times do
        again = identity_request(port, "#{path}?#{query}")
        expect([again.code, again["x-cache"]]).to eq([code, "hit"]), path
        expect(again["location"]).to eq(first["location"]), path
        expect(again["cache-control"]).to eq("public, max-age=60"), path
        expect(again.body.to_s).to eq(""), path
      end
      expect(hits(port, path)).to eq(1), path
    end
    expect(identity_request(port, "/cache/moved?#{cases['/cache/moved'][1]}")["location"]).to eq("/cache/new")
  end

  it "bypasses the cache for a request with Connection: upgrade, in any letter case" do
    _thrust, port = start_thrust_with_puma
    path = "/cache/upgrade.css?#{public_cc}"
    # Not stored from an upgrade request...
    response = identity_request(port, path, headers: { "Connection" => "Upgrade" })
    expect(response["x-cache"]).to eq("bypass")
    expect(identity_request(port, path)["x-cache"]).to eq("miss")
    # ...and not answered from the cache either.
    expect(identity_request(port, path)["x-cache"]).to eq("hit")
    ["upgrade", "keep-alive, UPGRADE"].each do |value|
      expect(identity_request(port, path, headers: { "Connection" => value })["x-cache"]).to eq("bypass"), value
    end
    expect(hits(port, "/cache/upgrade.css")).to eq(4)
  end

  it "answers a conditional hit with a 304 that carries validators, not representation metadata" do
    _thrust, port = start_thrust_with_puma
    path = "/cache/cond.css?#{public_cc}&vary=Accept"
    etag = identity_request(port, path)["etag"]
    gzip_etag = identity_request(port, path, headers: { "Accept-Encoding" => "gzip" }).then do |r|
      expect(r["content-encoding"]).to eq("gzip")
      r["etag"]
    end
    [[etag, "identity"], [gzip_etag, "gzip"]].each do |tag, coding|
      response = identity_request(port, path, headers: { "If-None-Match" => tag, "Accept-Encoding" => coding })
      expect([response.code, response["x-cache"], response["etag"]]).to eq(["304", "hit", tag]), coding
      expect(response["cache-control"]).to eq("public, max-age=60"), coding
      expect(response["vary"]).to include("Accept"), coding
      expect(response.to_hash.keys & %w[content-type content-length content-encoding]).to be_empty, coding
    end
  end

  it "sends 100 concurrent misses for one key upstream once" do
    _thrust, port = start_thrust_with_puma
    path = "/cache/herd.css?#{public_cc}&sleep=0.5"
    results = Queue.new
    threads = Array.new(100) do
      Thread.new do
        response = identity_request(port, path)
        results << [response.code, response.body]
      end
    end
    threads.each(&:join)
    answers = Array.new(100) { results.pop }
    expect(answers.map(&:first).uniq).to eq(["200"])
    expect(answers.map(&:last).uniq).to eq([css("/cache/herd.css")])
    expect(hits(port, "/cache/herd.css")).to eq(1)
  end

  it "keeps one entry per Vary variant" do
    _thrust, port = start_thrust_with_puma
    path = "/cache/vary.css?#{public_cc}&vary=Accept"
    html = identity_request(port, path, headers: { "Accept" => "text/html" })
    json = identity_request(port, path, headers: { "Accept" => "application/json" })
    expect([html["x-cache"], json["x-cache"]]).to eq(%w[miss miss])
    expect(identity_request(port, path, headers: { "Accept" => "text/html" }).body).to include("text/html")
    expect(identity_request(port, path,
                            headers: { "Accept" => "application/json" }).body).to include("application/json")
    expect(identity_request(port, path, headers: { "Accept" => "application/json" })["x-cache"]).to eq("hit")
    expect(hits(port, "/cache/vary.css")).to eq(2)
  end

  it "answers conditionals and ranges from the stored body" do
    _thrust, port = start_thrust_with_puma
    path = "/cache/cond.css?#{public_cc}"
    full = identity_request(port, path)
    etag = full["etag"]
    not_modified = identity_request(port, path, headers: { "If-None-Match" => etag })
    expect(not_modified.code).to eq("304")
    expect(not_modified["x-cache"]).to eq("hit")
    expect(not_modified["etag"]).to eq(etag)
    expect(identity_request(port, path, headers: { "If-None-Match" => '"other"' }).code).to eq("200")

    part = identity_request(port, path, headers: { "Range" => "bytes=0-9" })
    expect(part.code).to eq("206")
    expect(part["content-range"]).to eq("bytes 0-9/4000")
    expect(part.body).to eq(full.body.byteslice(0, 10))
    expect(part["x-cache"]).to eq("hit")
    suffix = identity_request(port, path, headers: { "Range" => "bytes=-5" })
    expect(suffix.body).to eq(full.body.byteslice(-5, 5))
    multi = identity_request(port, path, headers: { "Range" => "bytes=0-1,10-11" })
    expect(multi.code).to eq("206")
    expect(multi["content-type"]).to start_with("multipart/byteranges; boundary=")
    expect(multi.body).to include(full.body.byteslice(10, 2))
    expect(identity_request(port, path, headers: { "Range" => "bytes=5000-" }).code).to eq("416")
    expect(hits(port, "/cache/cond.css")).to eq(1)
  end

  it "compresses a stored body once per coding, decoding to the original" do
    _thrust, port = start_thrust_with_puma
    path = "/cache/big.css?#{public_cc}&size=100000"
    identity_request(port, path)
    %w[br zstd gzip].each do |coding|
      headers, body = curl(port, path, accept: coding)
      expect(headers["content-encoding"]).to eq(coding)
      expect(headers["x-cache"]).to eq("hit")
      expect(headers["vary"]).to eq("Accept-Encoding")
      expect(headers["etag"]).to match(%r{\AW/".*-#{coding}"\z})
      expect(body).to eq(css("/cache/big.css", 100_000))
    end
    raw = Array.new(2) { identity_request(port, path, headers: { "Accept-Encoding" => "br" }).body }
    expect(raw.uniq.size).to eq(1)
    expect(raw.first.bytesize).to be < 2_000
    expect(hits(port, "/cache/big.css")).to eq(1)
  end

  it "serves a browser the smallest stored coding, while an uncached response gets the cheapest" do
    _thrust, port = start_thrust_with_puma
    browser = "gzip, deflate, br, zstd"
    path = "/cache/browser.css?#{public_cc}&size=20000"
    identity_request(port, path)
    headers, body = curl(port, path, accept: browser)
    expect(headers["x-cache"]).to eq("hit")
    expect(headers["content-encoding"]).to eq("br")
    expect(body).to eq(css("/cache/browser.css", 20_000))
    # Not stored (private): compressed on every request, in zstd.
    headers, body = curl(port, "/cache/browser.css?cc=private&size=20000", accept: browser)
    expect(headers["x-cache"]).not_to eq("hit")
    expect(headers["content-encoding"]).to eq("zstd")
    expect(body).to eq(css("/cache/browser.css", 20_000))
  end

  it "serves a stale entry instead of a 502 while the app is down, within stale-if-error" do
    target = free_port
    puma = ChildProcess.start({ "PORT" => target.to_s }, "puma", "-C", File.join(FIXTURES, "puma.rb"),
                              File.join(FIXTURES, "app.ru"))
    # thrust only needs a child to supervise; the app runs on its own so it
    # can be stopped under the proxy.
    thrust = ChildProcess.start({ "HTTP_PORT" => "0", "TARGET_PORT" => target.to_s }, thrust_path,
                                "ruby", "-e", "sleep")
    port = thrust.http_port
    wait_for_ok(port, message: "Puma behind thrust")
    path = "/cache/stale.css?cc=public,+max-age%3D1,+stale-if-error%3D60"
    expect(identity_request(port, path)["x-cache"]).to eq("miss")
    expect(identity_request(port, path)["x-cache"]).to eq("hit")
    puma.signal("KILL")
    puma.wait
    wait_until(message: "the entry to go stale", timeout: 5) do
      identity_request(port, path)["x-cache"] == "stale"
    end
    stale = identity_request(port, path)
    expect(stale.code).to eq("200")
    expect(stale.body).to eq(css("/cache/stale.css"))
    expect(Integer(stale["age"])).to be >= 1
    expect(identity_request(port, "/cache/never-stored.css").code).to eq("502")
  end
end
