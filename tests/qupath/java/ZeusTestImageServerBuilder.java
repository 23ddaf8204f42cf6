import java.awt.Graphics2D;
import java.awt.Rectangle;
import java.awt.RenderingHints;
import java.awt.image.BufferedImage;
import java.io.File;
import java.io.IOException;
import java.net.URI;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Collection;
import java.util.Collections;
import java.util.Locale;

import javax.imageio.ImageIO;
import javax.imageio.ImageReadParam;
import javax.imageio.ImageReader;
import javax.imageio.stream.ImageInputStream;

import qupath.lib.images.servers.AbstractTileableImageServer;
import qupath.lib.images.servers.ImageServer;
import qupath.lib.images.servers.ImageServerBuilder;
import qupath.lib.images.servers.ImageServerBuilder.DefaultImageServerBuilder;
import qupath.lib.images.servers.ImageServerBuilder.ServerBuilder;
import qupath.lib.images.servers.ImageServerBuilder.UriImageSupport;
import qupath.lib.images.servers.ImageServerMetadata;
import qupath.lib.images.servers.TileRequest;

/**
 * TEST-ONLY STAND-IN, not part of zeus-qupath and not QuPath's code: an ImageServerBuilder that serves the
 * level-0 pixels of the test slides (tiled TIFF / SVS / OME-TIFF with JPEG tiles) through the JDK's own
 * ImageIO TIFF reader, so that QuPath's LabeledImageServer, ImageWriterTools and TileExporter run for real
 * in the tests. On an annotator's machine QuPath opens the slides with Bio-Formats or OpenSlide instead;
 * those extensions are not available here.
 *
 * Only the first TIFF image (level 0) is read; lower resolutions that a project's metadata declares are made
 * by QuPath asking for tiles at a downsample, which this server renders from level 0. Registered through
 * META-INF/services/qupath.lib.images.servers.ImageServerBuilder. Compiled by the test harness
 * (tests/qupath/harness.py) against each QuPath version; uses only API present in 0.4.4, 0.5.1 and 0.6.0.
 */
public class ZeusTestImageServerBuilder implements ImageServerBuilder<BufferedImage> {

    static boolean isTiff(URI uri) {
        if (!"file".equals(uri.getScheme()))
            return false;
        String name = uri.getPath().toLowerCase(Locale.ROOT);
        return name.endsWith(".svs") || name.endsWith(".tif") || name.endsWith(".tiff");
    }

    @Override
    public UriImageSupport<BufferedImage> checkImageSupport(URI uri, String... args) throws IOException {
        if (!isTiff(uri) || !new File(uri).isFile())
            return null;
        ServerBuilder<BufferedImage> builder = DefaultImageServerBuilder.createInstance(ZeusTestImageServerBuilder.class, uri, args);
        return UriImageSupport.createInstance(ZeusTestImageServerBuilder.class, 4f, Collections.singletonList(builder));
    }

    @Override
    public ImageServer<BufferedImage> buildServer(URI uri, String... args) throws Exception {
        if (!isTiff(uri))
            return null;
        return new Level0TiffServer(uri, args);
    }

    @Override
    public String getName() {
        return "ZEUS test-only TIFF reader (stand-in)";
    }

    @Override
    public String getDescription() {
        return "Test-only stand-in for Bio-Formats/OpenSlide: level 0 of a tiled TIFF through javax.imageio";
    }

    @Override
    public Class<BufferedImage> getImageType() {
        return BufferedImage.class;
    }

    /** The server: level 0 of the TIFF, tiles read with ImageIO's region reading, scaled for downsampled requests. */
    static class Level0TiffServer extends AbstractTileableImageServer {
        private final URI uri;
        private final String[] args;
        private final Path path;
        private final ImageServerMetadata metadata;

        Level0TiffServer(URI uri, String... args) throws IOException {
            this.uri = uri;
            this.args = args == null ? new String[0] : args.clone();
            this.path = Paths.get(uri);
            int width, height, tileWidth, tileHeight;
            ImageReader reader = open();
            try {
                width = reader.getWidth(0);
                height = reader.getHeight(0);
                tileWidth = reader.isImageTiled(0) ? reader.getTileWidth(0) : 256;
                tileHeight = reader.isImageTiled(0) ? reader.getTileHeight(0) : 256;
            } finally {
                close(reader);
            }
            this.metadata = new ImageServerMetadata.Builder(getClass(), uri.toString(), width, height)
                    .name(path.getFileName().toString())
                    .rgb(true)
                    .pixelType(qupath.lib.images.servers.PixelType.UINT8)
                    .channels(qupath.lib.images.servers.ImageChannel.getDefaultRGBChannels())
                    .preferredTileSize(tileWidth, tileHeight)
                    .build();
        }

        private ImageReader open() throws IOException {
            ImageInputStream in = ImageIO.createImageInputStream(path.toFile());
            if (in == null)
                throw new IOException("cannot open " + path);
            var readers = ImageIO.getImageReaders(in);
            if (!readers.hasNext()) {
                in.close();
                throw new IOException("no ImageIO reader for " + path);
            }
            ImageReader reader = readers.next();
            reader.setInput(in, false, true);
            return reader;
        }

        private static void close(ImageReader reader) throws IOException {
            Object input = reader.getInput();
            reader.dispose();
            if (input instanceof ImageInputStream)
                ((ImageInputStream) input).close();
        }

        @Override
        protected BufferedImage readTile(TileRequest request) throws IOException {
            int x = request.getImageX(), y = request.getImageY();
            int w = Math.min(request.getImageWidth(), getWidth() - x);
            int h = Math.min(request.getImageHeight(), getHeight() - y);
            BufferedImage full;
            ImageReader reader = open();
            try {
                ImageReadParam param = reader.getDefaultReadParam();
                param.setSourceRegion(new Rectangle(x, y, w, h));
                full = reader.read(0, param);
            } finally {
                close(reader);
            }
            BufferedImage rgb = new BufferedImage(request.getTileWidth(), request.getTileHeight(), BufferedImage.TYPE_INT_RGB);
            Graphics2D g = rgb.createGraphics();
            g.setRenderingHint(RenderingHints.KEY_INTERPOLATION, RenderingHints.VALUE_INTERPOLATION_BILINEAR);
            double d = request.getDownsample();
            g.drawImage(full, 0, 0, (int) Math.round(w / d), (int) Math.round(h / d), null);
            g.dispose();
            return rgb;
        }

        @Override
        protected ServerBuilder<BufferedImage> createServerBuilder() {
            return DefaultImageServerBuilder.createInstance(ZeusTestImageServerBuilder.class, getMetadata(), uri, args);
        }

        @Override
        protected String createID() {
            return getClass().getName() + ": " + uri;
        }

        @Override
        public Collection<URI> getURIs() {
            return Collections.singletonList(uri);
        }

        @Override
        public String getServerType() {
            return "ZEUS test-only TIFF reader (stand-in)";
        }

        @Override
        public ImageServerMetadata getOriginalMetadata() {
            return metadata;
        }
    }
}
