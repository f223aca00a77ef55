# frozen_string_literal: true

# The benchmark app: the same responses for every peer.
BIG = ENV.fetch("BENCH_BIG")
HELLO = "Hello, world!".b.freeze # 13 bytes
WORDS = %w[lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor].freeze
ROWS = (0...128).map do |i|
  "<tr><td class=\"n\">#{i}</td><td>#{WORDS.rotate(i % 12).join(' ')}</td>" \
    "<td><a href=\"/items/#{i}\">item #{i}</a></td></tr>\n"
end
PAGE = "<!doctype html><html><head><title>page</title><link rel=\"stylesheet\" href=\"/assets/app.css\">" \
       "</head><body><table>\n#{ROWS.join}</table></body></html>\n".b.freeze # ~20 KB
CSS = (0...1700).map do |i|
  ".c#{i} { color: ##{format('%06x', (i * 2_654_435_761) & 0xffffff)}; margin: #{i % 9}px #{i % 5}px; " \
    "padding: 0 #{i % 7}px; }\n"
end.join.b.freeze # ~100 KB

# bench/cache_tiers.rb's routes. It counts the requests for /assets/* that
# reach the app (GET /bench/asset-requests) to tell a cache hit from a
# request the proxy passed on, and restarts a proxy warm with many distinct
# cacheable assets: /assets/n/<i>.css, each ~8 KB and different.
asset_requests = 0
count_lock = Thread::Mutex.new
cache_tiers = lambda do |path|
  count_lock.synchronize { asset_requests += 1 } if path.start_with?("/assets/")
  if path == "/bench/asset-requests"
    count = asset_requests.to_s
    [200, { "content-type" => "text/plain", "content-length" => count.bytesize.to_s }, [count]]
  elsif (i = path[%r{\A/assets/n/(\d+)\.css\z}, 1])
    body = "/* asset #{i} */\n#{CSS.byteslice(0, 8192)}".b
    [200, { "content-type" => "text/css", "cache-control" => "public, max-age=31536000, immutable",
            "content-length" => body.bytesize.to_s }, [body]]
  end
end

# Streams a file in 256 KiB chunks (what Puma does without X-Sendfile).
class FileBody
  def initialize(path)
    @path = path
  end

  def to_path = @path

  def each
    File.open(@path, "rb") do |f|
      while (chunk = f.read(256 * 1024))
        yield chunk
      end
    end
  end
end

run lambda { |env|
  routed = cache_tiers.call(env["PATH_INFO"])
  return routed if routed

  case env["PATH_INFO"]
  when "/hello", "/up"
    [200, { "content-type" => "text/plain", "content-length" => "13" }, [HELLO]]
  when "/page"
    [200, { "content-type" => "text/html; charset=utf-8", "cache-control" => "private",
            "content-length" => PAGE.bytesize.to_s }, [PAGE]]
  when "/assets/app.css"
    [200, { "content-type" => "text/css", "cache-control" => "public, max-age=31536000, immutable",
            "content-length" => CSS.bytesize.to_s }, [CSS]]
  when "/stream"
    # The app streams the file itself: what response buffering handles.
    [200, { "content-type" => "application/octet-stream", "content-length" => File.size(BIG).to_s },
     FileBody.new(BIG)]
  when "/download"
    if env["HTTP_X_SENDFILE_TYPE"] == "X-Sendfile"
      [200, { "content-type" => "application/octet-stream", "x-sendfile" => BIG, "content-length" => "0" }, []]
    else
      [200, { "content-type" => "application/octet-stream", "content-length" => File.size(BIG).to_s },
       FileBody.new(BIG)]
    end
  else
    [404, { "content-type" => "text/plain", "content-length" => "9" }, ["not found"]]
  end
}
